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


def original_checkpoint(name: str, params: dict, seed: int = 0) -> tuple[torch.nn.Module, dict]:
    """(the transcribed original model, its checkpoint as CR_recon's Trainer writes it after one
    AdamW step). The step uses random gradients instead of a forward/backward pass (the file's
    contents are the same kind; default-size models would take seconds per step), and every
    weight is moved off its initial value so that a loader that drops or misplaces one is seen."""
    torch.manual_seed(seed)
    model = original.get_model(name, **params)
    step = original.OriginalStep(model, original.get_loss("mse_pearson"), lr=1e-3, total_steps=10)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
            p.grad = torch.randn_like(p)
    step.opt.step()
    step.sched.step()
    model.eval()
    return model, step.checkpoint(epoch=0, val_loss=0.5, best_val_loss=0.5)
