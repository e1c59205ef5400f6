"""Checkpoints as CR_recon writes them, for the loading tests: the original Trainer's dict
{model, optimizer, epoch, val_loss, best_val_loss}, produced by training the transcribed original
classes for a few steps, and saved so that every tensor claims a cuda:0 storage, as a checkpoint
written on a GPU does (loading it without map_location fails on a CPU-only machine)."""
from __future__ import annotations

import io
import zipfile
from pathlib import Path

import torch

from tests.spectral_ref import original


def save_claiming_cuda(obj, path: str | Path) -> None:
    """torch.save, then the storage location recorded in the pickle ('cpu') rewritten to 'cuda:0'."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    out = io.BytesIO()
    with zipfile.ZipFile(buf) as zin, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = zin.read(info.filename)
            if info.filename.endswith("/data.pkl"):
                cpu, cuda = b"X\x03\x00\x00\x00cpu", b"X\x06\x00\x00\x00cuda:0"   # BINUNICODE 'cpu'
                assert cpu in data, "storage location not found in the pickle"
                data = data.replace(cpu, cuda)
            zout.writestr(info, data)
    Path(path).write_bytes(out.getvalue())


def original_checkpoint(name: str, params: dict, steps: int = 2, batch: int = 2, seed: int = 0) -> tuple[torch.nn.Module, dict]:
    """(the transcribed original model after `steps` AdamW steps, its checkpoint dict)."""
    torch.manual_seed(seed)
    model = original.get_model(name, **params)
    out_len = params.get("out_len", 30)
    step = original.OriginalStep(model, original.get_loss("mse_pearson", w_mse=0.5, w_corr=0.5), lr=1e-3,
                                 total_steps=10)
    g = torch.Generator().manual_seed(seed + 1)
    for _ in range(steps):
        x = torch.randint(0, 2, (batch, 1, 128, 128), generator=g).float() * 2 - 1
        y = torch.rand(batch, 2, 2, out_len, generator=g)
        step(x, y)
    model.eval()
    return model, step.checkpoint(epoch=steps - 1, val_loss=0.5, best_val_loss=0.5)
