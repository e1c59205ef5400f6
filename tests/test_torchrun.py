"""Training under torchrun (2 CPU processes, gloo) and built-in data made by processes at once."""
from __future__ import annotations

import multiprocessing
import os
import time

import pytest

import common.data as D


def _generate_slowly(folder):
    """A generator that takes long enough for the other process to arrive while it runs."""
    with open(os.environ["CALLS_LOG"], "a") as f:
        f.write(f"{os.getpid()}\n")
    for i in range(20):
        (folder / f"part_{i:02d}.txt").write_text(str(i))
        time.sleep(0.02)


def _ensure(queue):
    try:
        root = D.ensure_builtin("demo", "v1", _generate_slowly)
        queue.put(("ok", str(root), sorted(p.name for p in root.iterdir())))
    except BaseException as e:  # noqa: BLE001 - reported to the test
        queue.put(("error", repr(e), []))


def test_processes_generating_the_builtin_data_at_once_build_it_once(tmp_path, monkeypatch):
    monkeypatch.setenv(D.BUILTIN_ENV, str(tmp_path / "builtin"))
    monkeypatch.setenv("CALLS_LOG", str(tmp_path / "calls.log"))
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_ensure, args=(queue,)) for _ in range(3)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert all(r[0] == "ok" for r in results), results
    expected = [".builtin-version"] + [f"part_{i:02d}.txt" for i in range(20)]
    assert all(r[1] == str(tmp_path / "builtin" / "demo") and r[2] == expected for r in results), results
    assert len((tmp_path / "calls.log").read_text().split()) == 1   # one process generated, the others waited
    root = tmp_path / "builtin" / "demo"
    assert [(root / f"part_{i:02d}.txt").read_text() for i in range(20)] == [str(i) for i in range(20)]
    assert sorted(p.name for p in root.parent.iterdir()) == [".demo.lock", "demo"]   # no temporary folders left
