"""Built-in demo data location, CSV reading with clear errors, and deterministic data loaders."""
from __future__ import annotations

import contextlib
import csv
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
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
    directory that gets the version marker last and is then renamed into place, so an interrupted
    generation is never picked up. A dataset made by another `version` of the generator is replaced.
    The check and the generation hold an exclusive lock on `.<task>.lock` beside the dataset, so
    processes starting at once (torchrun's ranks, two users' runs) generate it once: the first
    builds, the others wait and then use it.
    """
    root = builtin_dir(task)
    quiet = os.environ.get("RANK", "0") != "0"   # under torchrun (before or after joining the group) rank 0 reports
    if _builtin_version(root) == version:  # the usual case: no lock needed to read a finished dataset
        if not quiet:
            print(f"using built-in demo data ({task}) at {root} -- no --data given")
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(root.parent / f".{task}.lock", None if quiet else
                         f"waiting for another process that is generating the built-in data in {root}"):
        if _builtin_version(root) == version:   # another process made it while this one waited
            if not quiet:
                print(f"using built-in demo data ({task}) at {root} -- no --data given")
            return root
        for stale in root.parent.glob(f".{task}-*"):   # left by a killed generation (the lock says none runs)
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{task}-", dir=root.parent))
        try:
            if not quiet:
                print(f"no --data given: generating the built-in demo dataset for {task} in {root}")
            generate(tmp)
            (tmp / BUILTIN_STAMP).write_text(version)
            if root.exists():   # another version's dataset: moved aside first, so root is never half-deleted
                old = Path(tempfile.mkdtemp(prefix=f".{task}-old-", dir=root.parent))
                root.rename(old / task)
            tmp.rename(root)
        finally:
            for leftover in root.parent.glob(f".{task}-*"):
                shutil.rmtree(leftover, ignore_errors=True)
    return root


BUILTIN_STAMP = ".builtin-version"


def _builtin_version(root: Path) -> str | None:
    try:
        return (root / BUILTIN_STAMP).read_text().strip()
    except OSError:
        return None


@contextlib.contextmanager
def _exclusive_lock(path: Path, waiting: str | None = None):
    """flock on `path`, printing `waiting` if another process holds it. The file is created if
    missing and never removed (removing a lock file races with a process that has just opened it).
    Without fcntl (Windows) there is no lock; the rename into place still keeps a half-made
    dataset from being used."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if waiting:
                print(waiting, flush=True)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


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


class SeededSamples(Dataset):
    """Each sample's random augmentation depends on (seed, epoch, index) alone, not on which
    process loads it or after what: a run gives the same result with any --workers, so a resume
    may change it. The RNG states around the call are restored (dropout keeps its own stream)."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        s = ((self.seed * 1000003 + self.epoch) * 1000033 + int(i)) % 2**63
        saved = torch.get_rng_state(), np.random.get_state(), random.getstate()
        try:
            torch.default_generator.manual_seed(s)
            np.random.seed(s % 2**32)
            random.seed(s)
            return self.dataset[i]
        finally:
            torch.set_rng_state(saved[0])
            np.random.set_state(saved[1])
            random.setstate(saved[2])


def train_loader(dataset: Dataset, batch_size: int, *, seed: int, workers: int, info: DistInfo,
                 drop_last: bool = False, sampler: Sampler | None = None, pin_memory: bool = False) -> DataLoader:
    """Shuffled loader whose order and augmentation depend only on (seed, epoch).

    Call `set_epoch(loader, epoch)` before each epoch. The order is a DistributedSampler
    permutation, so one process with batch B*N sees the same global batches as N processes
    with batch B each; each sample is drawn through SeededSamples.
    """
    if sampler is None:
        sampler = DistributedSampler(dataset, num_replicas=info.world_size, rank=info.rank,
                                     shuffle=True, seed=seed, drop_last=drop_last)
    return DataLoader(SeededSamples(dataset, seed), batch_size=batch_size, sampler=sampler, num_workers=workers,
                      drop_last=drop_last, worker_init_fn=seed_worker, generator=torch.Generator(),
                      pin_memory=pin_memory, persistent_workers=False)


def eval_loader(dataset: Dataset, batch_size: int, *, workers: int, info: DistInfo) -> DataLoader:
    """Ordered loader over this process's shard (the whole set when not distributed)."""
    return DataLoader(dataset, batch_size=batch_size, sampler=ShardSampler(len(dataset), info),
                      num_workers=workers, worker_init_fn=seed_worker, generator=torch.Generator())


def set_epoch(loader: DataLoader, epoch: int, seed: int) -> None:
    if hasattr(loader.sampler, "set_epoch"):
        loader.sampler.set_epoch(epoch)
    if isinstance(loader.dataset, SeededSamples):
        loader.dataset.epoch = epoch
    if loader.generator is not None:  # seeds the workers' RNGs for this epoch
        loader.generator.manual_seed(seed * 100003 + epoch)
