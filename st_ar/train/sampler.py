"""The batch order of both trainers: distributed, resumable at any step.

Each epoch is a seeded permutation (seed + epoch) dealt out to the ranks like DistributedSampler,
the ragged tail dropped so every rank sees the same number of images. A rank's share is cut into
batches, ``accum`` consecutive batches make one optimizer step, and the batches left over at the
end of an epoch are dropped. So the batches of any step are a function of (seed, step, world
size, batch, accum) alone: a resumed run that starts at the checkpoint's step sees exactly the
batches an uninterrupted one would have seen, and no position other than the step is needed.

    sampler = StepBatches(len(dataset), batch, accum=2, rank=r, world_size=w, seed=s)
    sampler.set_steps(start, stop)     # the steps this DataLoader(batch_sampler=sampler) serves
    sampler.set_epoch(e)               # or one whole epoch

The GPT trainer serves one epoch per DataLoader iterator (its dataset draws views per epoch); the
tokenizer trainer one iterator for the whole run.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class StepBatches(Sampler[list[int]]):
    def __init__(
        self,
        size: int,
        batch: int,
        *,
        accum: int = 1,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
    ):
        if size < world_size:
            raise ValueError(f"dataset of {size} images is smaller than the {world_size} ranks")
        self.size, self.batch, self.accum = size, batch, accum
        self.rank, self.world_size, self.seed, self.shuffle = rank, world_size, seed, shuffle
        self.per_rank = size // world_size  # images per rank per epoch
        self.steps_per_epoch = self.per_rank // (batch * accum)
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"the training set has {size} images: each of {world_size} rank(s) gets {self.per_rank} per epoch, "
                f"fewer than one step's batch ({batch * accum})"
            )
        self.start, self.stop = 0, self.steps_per_epoch

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch

    def position(self, step: int) -> tuple[int, int]:
        """(epoch, batches of that epoch already taken) once ``step`` steps are done."""
        epoch, done = divmod(step, self.steps_per_epoch)
        return epoch, done * self.accum

    def set_steps(self, start: int, stop: int) -> None:
        self.start, self.stop = start, stop

    def set_epoch(self, epoch: int) -> None:
        self.set_steps(epoch * self.steps_per_epoch, (epoch + 1) * self.steps_per_epoch)

    def epoch_order(self, epoch: int) -> list[int]:
        """This rank's indices of ``epoch``, in order."""
        if self.shuffle:
            order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + epoch))
        else:
            order = torch.arange(self.size)
        return order[: self.per_rank * self.world_size][self.rank :: self.world_size].tolist()

    def __len__(self) -> int:
        return max(0, self.stop - self.start) * self.accum

    def __iter__(self) -> Iterator[list[int]]:
        epoch, order = -1, []
        for step in range(self.start, self.stop):
            e, i = divmod(step, self.steps_per_epoch)
            if e != epoch:
                epoch, order = e, self.epoch_order(e)
            for j in range(i * self.accum, (i + 1) * self.accum):
                yield order[j * self.batch : (j + 1) * self.batch]
