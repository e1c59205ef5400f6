"""Built-in demo data location, CSV reading with clear errors, and deterministic data loaders."""
from __future__ import annotations

import csv
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from common.distributed import DistInfo
from common.io import UserError
from common.repro import seed_worker

BUILTIN_ENV = "INDVISION_BUILTIN_DIR"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def builtin_dir(task: str) -> Path:
    """Where `task` keeps its generated demo dataset: $INDVISION_BUILTIN_DIR/<task>, else
    ~/.cache/industrial-vision/builtin/<task>. Never inside a user's --data folder."""
    root = os.environ.get(BUILTIN_ENV) or Path.home() / ".cache" / "industrial-vision" / "builtin"
    return Path(root) / task


def ensure_builtin(task: str, version: str, generate: Callable[[Path], None]) -> Path:
    """Return the built-in dataset for `task`, generating it on first use.

    `generate(dir)` writes the dataset in the task's real on-disk format. It runs in a temporary
    directory that is renamed into place, so an interrupted generation is never picked up. A
    dataset made by another `version` of the generator is replaced.
    """
    root = builtin_dir(task)
    stamp = root / ".builtin-version"
    if stamp.is_file() and stamp.read_text().strip() == version:
        print(f"using built-in demo data ({task}) at {root} -- no --data given")
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{task}-", dir=root.parent))
    try:
        print(f"no --data given: generating the built-in demo dataset for {task} in {root}")
        generate(tmp)
        (tmp / ".builtin-version").write_text(version)
        if root.exists():
            shutil.rmtree(root)
        try:
            tmp.rename(root)
        except OSError:  # another process finished first; theirs is as good as ours
            if not stamp.is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def read_csv(path: str | os.PathLike, required: tuple[str, ...]) -> list[tuple[int, dict]]:
    """Rows of a CSV with a header, as (line number, row); a missing column or file is a UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            missing = [c for c in required if c not in (reader.fieldnames or [])]
            if missing:
                raise UserError(f"{path}: missing column(s) {', '.join(missing)} "
                                f"(header is: {','.join(reader.fieldnames or [])})")
            rows = []
            for row in reader:
                if None in row:  # DictReader files fields beyond the header under the key None
                    raise UserError(f"{path}, line {reader.line_num}: {len(reader.fieldnames) + len(row[None])} "
                                    f"fields, but the header has {len(reader.fieldnames)}")
                rows.append((reader.line_num, row))
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a UTF-8 text CSV file") from None
    except csv.Error as e:
        raise UserError(f"{path}: malformed CSV ({e})") from None
    if not rows:
        raise UserError(f"{path}: no data rows")
    return rows


def list_images(item: str | os.PathLike) -> list[Path]:
    """An image file as given, or every image below a folder (sorted); anything else is a UserError."""
    item = Path(item)
    if item.is_dir():
        found = sorted(p for p in item.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not found:
            raise UserError(f"{item}: folder holds no images ({', '.join(IMAGE_SUFFIXES)})")
        return found
    if item.is_file():
        return [item]
    raise UserError(f"{item}: no such file or folder")


class ShardSampler(Sampler):
    """Indices rank, rank+W, rank+2W, ...: every sample exactly once over all processes, no padding."""

    def __init__(self, n: int, info: DistInfo):
        self.indices = list(range(info.rank, n, info.world_size))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)


class BalancedSampler(Sampler):
    """Class-balanced sampling with replacement (sample weight 1/count of its class).

    The draw depends only on (seed, epoch, rank), so resumed runs replay it exactly; under
    torchrun each process draws its own len/world_size samples.
    """

    def __init__(self, labels: torch.Tensor, seed: int, info: DistInfo):
        labels = torch.as_tensor(labels, dtype=torch.long)
        self.weights = 1.0 / torch.bincount(labels).double()[labels]
        self.num_samples = -(-len(labels) // info.world_size)
        self.seed, self.rank, self.epoch = seed, info.rank, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed((self.seed * 1000003 + self.epoch) * 1009 + self.rank)
        return iter(torch.multinomial(self.weights, self.num_samples, replacement=True, generator=g).tolist())

    def __len__(self):
        return self.num_samples


def train_loader(dataset: Dataset, batch_size: int, *, seed: int, workers: int, info: DistInfo,
                 drop_last: bool = False, sampler: Sampler | None = None, pin_memory: bool = False) -> DataLoader:
    """Shuffled loader whose order and worker seeds depend only on (seed, epoch).

    Call `set_epoch(loader, epoch)` before each epoch. The order is a DistributedSampler
    permutation, so one process with batch B*N sees the same global batches as N processes
    with batch B each.
    """
    if sampler is None:
        sampler = DistributedSampler(dataset, num_replicas=info.world_size, rank=info.rank,
                                     shuffle=True, seed=seed, drop_last=drop_last)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                      drop_last=drop_last, worker_init_fn=seed_worker, generator=torch.Generator(),
                      pin_memory=pin_memory, persistent_workers=False)


def eval_loader(dataset: Dataset, batch_size: int, *, workers: int, info: DistInfo) -> DataLoader:
    """Ordered loader over this process's shard (the whole set when not distributed)."""
    return DataLoader(dataset, batch_size=batch_size, sampler=ShardSampler(len(dataset), info),
                      num_workers=workers, worker_init_fn=seed_worker, generator=torch.Generator())


def set_epoch(loader: DataLoader, epoch: int, seed: int) -> None:
    if hasattr(loader.sampler, "set_epoch"):
        loader.sampler.set_epoch(epoch)
    if loader.generator is not None:  # seeds the workers' RNGs for this epoch
        loader.generator.manual_seed(seed * 100003 + epoch)
