"""Training views from pre-extracted codes: each image gives M distinct crops (M = 1 for the LlamaGen
baseline, M = 2 for ST-AR's view-contrastive loss) as token sequences.

Views are pre-extracted crops, not augmentations tokenized on the fly: tokenizing during training would
cost a VQ encoder pass per view per step, while the ten crops per crop range already are the paper's and
LlamaGen's augmentations. Per sample, one crop range is drawn (LlamaGen picks one of its 1.1 / 1.05 sets at
random), then M distinct crops of that range, without replacement. With ``same_orientation``
(data.same_orientation_views) the crops of an image are either all unmirrored or all mirrored: of
ten crops, a uniform pair has exactly one mirrored crop in 5/9 of the draws, and then position k
of one view holds the mirrored column of the other's.

The draw is a pure function of (seed, epoch, index): no RNG state lives in the workers, so the same views
come back whatever the number of DataLoader workers or ranks, and a resumed run sees the same data.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from .codes import check_codes_match, map_codes, read_codes_labels, read_codes_meta

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    """One step of the SplitMix64 mixer: a cheap 64-bit hash whose outputs pass as independent uniforms."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def choose_views(
    seed: int,
    epoch: int,
    index: int,
    num_ranges: int,
    crops_per_range: int,
    num_views: int,
    groups: list[list[int]] | None = None,
) -> list[int]:
    """Crop-axis indices (r * crops_per_range + c) of ``num_views`` distinct crops of one crop range.

    A counter-based draw: the key (seed, epoch, index) is hashed, and successive hashes pick the range
    and then a partial Fisher-Yates shuffle of the crops (modulo bias is below 2**-59). ``groups``
    (crop indices within a range, e.g. the unmirrored and the mirrored crops): the next hash picks one
    group, and the views are distinct crops of that group alone; None draws as before.
    """
    if groups is not None and not all(1 <= num_views <= len(g) for g in groups):
        raise ValueError(f"cannot draw {num_views} distinct views from crop groups of {[len(g) for g in groups]}")
    if not 1 <= num_views <= crops_per_range:
        raise ValueError(f"cannot draw {num_views} distinct views from {crops_per_range} crops per crop range")
    state = _splitmix64(_splitmix64(_splitmix64(seed & _MASK64) ^ (epoch & _MASK64)) ^ (index & _MASK64))

    def draw(n: int) -> int:
        nonlocal state
        state = _splitmix64(state)
        return state % n

    r = draw(num_ranges)
    order = list(range(crops_per_range)) if groups is None else list(groups[draw(len(groups))])
    for k in range(num_views):  # the first num_views slots of a uniform shuffle
        j = k + draw(len(order) - k)
        order[k], order[j] = order[j], order[k]
    return [r * crops_per_range + c for c in order[:num_views]]


def orientation_groups(crop_names: list[str]) -> list[list[int]]:
    """The crops of a range split by orientation: [unmirrored, mirrored] indices (ten crops: 0-4, 5-9)."""
    mirrored = [c for c, name in enumerate(crop_names) if name.startswith("flip_")]
    plain = [c for c, name in enumerate(crop_names) if not name.startswith("flip_")]
    return [plain, mirrored]


class CodesDataset(Dataset):
    """Memory-mapped codes of an extraction folder: ``ds[i] -> ((num_views, T) int64 codes, label)``.

    Images skipped as corrupt during extraction (label -1) are left out, so ``len(ds)`` may be below
    meta["count"]. The memmap is opened on first access in each process (DataLoader workers included),
    never pickled. Call ``set_epoch(epoch)`` each epoch, next to ``DistributedSampler.set_epoch``: the
    epoch lives in shared memory, so persistent workers see it too.

    ``vocab_size`` / ``seq_len``: the model's vocabulary and block size, checked against the codes now
    rather than failing (or silently mis-training) later.
    """

    def __init__(
        self,
        folder: str | os.PathLike,
        num_views: int = 1,
        *,
        vocab_size: int | None = None,
        seq_len: int | None = None,
        seed: int = 0,
        same_orientation: bool = False,
    ):
        self.folder = os.fspath(folder)
        self.meta: dict[str, Any] = read_codes_meta(self.folder)
        if vocab_size is not None or seq_len is not None:
            check_codes_match(
                self.meta,
                self.meta["vocab_size"] if vocab_size is None else vocab_size,
                self.meta["seq_len"] if seq_len is None else seq_len,
            )
        self.num_ranges = len(self.meta["crop_ranges"])
        self.crops_per_range = self.meta["crops_per_range"]
        if not 1 <= num_views <= self.crops_per_range:
            raise ValueError(
                f"num_views={num_views} but {self.folder} has {self.crops_per_range} crop(s) per image and crop range "
                f"(crops={self.meta['crops']!r}); extract with --crops ten for up to 10 distinct views"
            )
        self.num_views, self.seed = num_views, seed
        self.groups = None  # data.same_orientation_views: the views of an image all mirrored or all not
        if same_orientation:
            self.groups = orientation_groups(self.meta["crop_names"])
            if min(len(g) for g in self.groups) < num_views:
                raise ValueError(
                    f"data.same_orientation_views needs {num_views} crop(s) of each orientation, but {self.folder} "
                    f"has crops {self.meta['crops']!r}; extract with --crops ten (five plain, five mirrored)"
                )
        self._rows, self._labels = read_codes_labels(self.folder)  # dataset index -> row of codes.npy, label
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()
        self._codes: np.ndarray | None = None

    # --- facts about the codes
    @property
    def num_classes(self) -> int:
        return self.meta["num_classes"]

    @property
    def grid(self) -> tuple[int, int]:
        return tuple(self.meta["grid"])

    @property
    def seq_len(self) -> int:
        return self.meta["seq_len"]

    @property
    def vocab_size(self) -> int:
        return self.meta["vocab_size"]

    def labels(self) -> np.ndarray:
        return self._labels.copy()

    # --- sampling
    def set_epoch(self, epoch: int) -> None:
        self._epoch.fill_(epoch)

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    def views(self, i: int) -> list[int]:
        """Crop-axis indices of the views ``ds[i]`` returns at the current epoch."""
        return choose_views(
            self.seed, self.epoch, i, self.num_ranges, self.crops_per_range, self.num_views, self.groups
        )

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        if not 0 <= i < len(self._rows):
            raise IndexError(f"index {i} out of range for {len(self._rows)} images")
        if self._codes is None:
            self._codes = map_codes(self.folder)  # (N, K, T)
        seqs = self._codes[self._rows[i], self.views(i)]  # (num_views, T), copied out of the map
        return torch.from_numpy(seqs.astype(np.int64)), int(self._labels[i])

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_codes"] = None  # each worker maps the file itself
        return state
