"""The training data order: several datasets mixed by weight, a pure function of (seed, position).

Position p of the infinite sample stream maps to (dataset, sample index) without any state, so a
resumed run continues from ``step * global_batch_size`` exactly, with any number of processes.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from functools import lru_cache


class MixtureOrder:
    """Epochs of ``epoch_length`` positions; each position draws a dataset by weight, and each
    dataset walks through its own per-epoch permutation (cycled if drawn more often than it has
    samples)."""

    def __init__(self, sizes: Sequence[int], weights: Sequence[float], seed: int,
                 epoch_length: int | None = None) -> None:
        if not sizes or any(n <= 0 for n in sizes):
            raise ValueError(f"every training dataset needs at least one sample; sizes: {list(sizes)}")
        if len(weights) != len(sizes) or any(w <= 0 for w in weights):
            raise ValueError(f"weights must be positive, one per dataset; got {list(weights)}")
        self.sizes = list(sizes)
        self.weights = list(weights)
        self.seed = seed
        self.epoch_length = epoch_length or sum(sizes)

    def __getitem__(self, position: int) -> tuple[int, int]:
        epoch, offset = divmod(position, self.epoch_length)
        return self._epoch(epoch)[offset]

    @lru_cache(maxsize=4)  # noqa: B019 - a handful of epochs, owned by one long-lived object
    def _epoch(self, epoch: int) -> list[tuple[int, int]]:
        rng = random.Random(f"{self.seed}/epoch/{epoch}")
        choices = rng.choices(range(len(self.sizes)), weights=self.weights, k=self.epoch_length)
        perms = []
        for d, n in enumerate(self.sizes):
            perm = list(range(n))
            random.Random(f"{self.seed}/epoch/{epoch}/dataset/{d}").shuffle(perm)
            perms.append(perm)
        cursors = [0] * len(self.sizes)
        out = []
        for d in choices:
            out.append((d, perms[d][cursors[d] % self.sizes[d]]))
            cursors[d] += 1
        return out


def step_positions(step: int, global_batch: int, micro_batch: int, process_index: int,
                   num_processes: int) -> list[list[int]]:
    """Stream positions of one optimizer step for one process, split into its micro-batches.

    The step covers positions [step * G, (step + 1) * G); micro-batch m of process r takes the
    chunk m * num_processes + r, so the samples of a step do not depend on the process count.
    """
    chunks = global_batch // micro_batch
    base = step * global_batch
    return [list(range(base + c * micro_batch, base + (c + 1) * micro_batch))
            for c in range(process_index, chunks, num_processes)]
