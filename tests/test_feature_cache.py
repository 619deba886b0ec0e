"""The feature cache shared by concurrent processes (e.g. one training run per seed)."""

from __future__ import annotations

import multiprocessing as mp
import time
from pathlib import Path

import numpy as np
import torch

from sam_mllm.data.feature_cache import FeatureCache


def _encode(chunk: list[Path]) -> torch.Tensor:
    time.sleep(0.2)  # long enough for the other process to start building meanwhile
    return torch.stack([torch.full((3, 2), float(int(p.stem))) for p in chunk])


def _build(root: str, files: list[str]) -> None:
    FeatureCache(root, "bb", "tf").build([Path(f) for f in files], _encode, batch_size=2)


def test_two_processes_building_one_cache_keep_each_others_rows(tmp_path):
    files = []
    for i in range(12):
        f = tmp_path / f"{i}.png"
        f.write_bytes(b"x" * (i + 1))
        files.append(str(f))
    ctx = mp.get_context("spawn")
    # The two sets overlap in 4 files: the second builder must not encode or store them twice.
    procs = [ctx.Process(target=_build, args=(str(tmp_path / "cache"), part)) for part in (files[:8], files[4:])]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    cache = FeatureCache(tmp_path / "cache", "bb", "tf")
    assert len(cache.index["rows"]) == 12 and len(cache.index["shards"]) == 2
    for f in files:
        assert torch.equal(cache.get(f), torch.full((3, 2), float(int(Path(f).stem))))
    assert not list(cache.dir.glob("*.tmp"))
    assert sum(np.load(cache.dir / s).shape[0] for s in cache.index["shards"]) == 12
