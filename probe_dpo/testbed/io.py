"""The small file helpers of a testbed build: atomic writes, jsonl, a build lock, torch threads."""

from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path
from typing import Any, Iterator

from probe_dpo.stats import stable_seed


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            h.update(block)
    return h.hexdigest()


def seeded_rng(*parts: Any):
    import numpy as np

    return np.random.default_rng(stable_seed(*parts))


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """One builder at a time for a cache folder (other processes wait), with ``filelock``."""
    from filelock import FileLock

    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path)):
        yield


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[int]:
    import torch

    before = torch.get_num_threads()
    if n is None:
        try:
            n = len(os.sched_getaffinity(0))
        except AttributeError:  # not Linux
            n = os.cpu_count() or 1
    torch.set_num_threads(n)
    try:
        yield n
    finally:
        torch.set_num_threads(before)
