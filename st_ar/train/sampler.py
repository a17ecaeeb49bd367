"""A distributed, resumable epoch sampler.

Like DistributedSampler (a seeded permutation per epoch, dealt out to the ranks, ragged tail
dropped so every rank sees the same number of images) plus a starting offset, so a resumed run
continues mid-epoch with exactly the batches it would have seen.
"""

from __future__ import annotations

import torch
from torch.utils.data import Sampler


class EpochSampler(Sampler[int]):
    def __init__(self, size: int, *, rank: int = 0, world_size: int = 1, seed: int = 0, shuffle: bool = True):
        if size < world_size:
            raise ValueError(f"dataset of {size} images is smaller than the {world_size} ranks")
        self.size, self.rank, self.world_size, self.seed, self.shuffle = size, rank, world_size, seed, shuffle
        self.epoch = 0
        self.start = 0  # index (within this rank's share) to start from, for resuming mid-epoch

    @property
    def per_rank(self) -> int:
        return self.size // self.world_size

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __iter__(self):
        if self.shuffle:
            order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        else:
            order = torch.arange(self.size)
        mine = order[: self.per_rank * self.world_size][self.rank :: self.world_size]
        return iter(mine[self.start :].tolist())

    def __len__(self) -> int:
        return self.per_rank - self.start
