"""Many samples from one GPT into one folder: OUT/codes.npy, OUT/samples.npz and OUT/grid.png.

    report = sample_to_files(model, vq, classes, out, SampleSettings(batch_size=64, seed=0), info)

``codes.npy``: (N, T) int64, in the order of ``classes``. With a tokenizer, ``samples.npz``: uint8
N x H x W x 3 under "arr_0" (the ADM evaluator's format) and the class of every sample under "labels";
``grid.png``: some of the images. Each file appears whole or not at all (``runfolder.atomic_write``).

Two ways to seed, both deterministic:

- ``"per-batch"`` (``st-ar sample``): the request is cut into global batches of ``batch_size`` samples,
  padded to whole steps of every process (DiT's sample_ddp.py: collectives and GPU throughput want equal,
  full batches), and batch j draws from its own generator seeded with ``batch_seed(seed, j)``. Rank r runs
  batches r, r + K, r + 2K, ...; ranks other than 0 write their rows to OUT/parts/rank{r}.npz, and rank 0
  places every row at its global index and packs the files. Sample i is the same on any number of
  processes.
- ``"stream"`` (the demo and benchmarks/reproduce.py, whose committed results were sampled this way): one
  process, one generator seeded with ``seed``, drawn through the batches in order; the last batch may be
  short.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import chain
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image

from ..distributed import DistInfo, barrier
from ..images import make_grid
from ..progress import progress_bar
from ..runfolder import atomic_write
from .generate import check_sampling_settings, generate_images

SEEDINGS = ("per-batch", "stream")
GRID_LIMIT = 256  # images in st-ar sample's grid.png

# a part is (global indices (n,), codes (n, T), uint8 images (n, H, W, 3) or None)
Part = tuple[np.ndarray, np.ndarray, np.ndarray | None]


@dataclass(frozen=True)
class SampleSettings:
    """generate()'s settings, the samples per process and step, and how the batches are seeded."""

    cfg_scale: float = 1.0
    cfg_interval: int = -1
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    batch_size: int = 32
    seed: int = 0
    seeding: str = "per-batch"  # or "stream"; see the module docstring
    compile: bool = False  # generate()'s compiled static decode step: same tokens, one graph for every position

    def __post_init__(self):
        check_sampling_settings(**self.generate_kwargs())
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size}")
        if self.seeding not in SEEDINGS:
            raise ValueError(f"seeding must be one of {', '.join(SEEDINGS)}, got {self.seeding!r}")

    def generate_kwargs(self) -> dict:
        """generate()'s keyword arguments."""
        return dict(
            cfg_scale=self.cfg_scale,
            cfg_interval=self.cfg_interval,
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
        )


class SampleReport(NamedTuple):
    samples: int  # as asked for (padding dropped)
    seconds: float  # sampling and decoding on every process, until the last part is on disk
    written: list[str]  # file names in the output folder; empty on ranks other than 0


def batch_seed(seed: int, batch: int) -> int:
    """Seed of global batch ``batch``: depends on neither the rank nor the number of processes."""
    return (seed * 1_000_003 + batch) % 2**64


def padded_labels(classes: Sequence[int], global_batch: int) -> list[int]:
    """``classes`` repeated cyclically up to a multiple of ``global_batch``, so every rank runs the same
    number of full batches (collectives and GPU throughput want equal, full batches)."""
    total = -(-len(classes) // global_batch) * global_batch
    return [classes[i % len(classes)] for i in range(total)]


def rank_batches(num_batches: int, info: DistInfo) -> range:
    """Global batches of this rank: round-robin, so rank r runs r, r + K, r + 2K, ..."""
    return range(info.rank, num_batches, info.world_size)


def class_grid(num_classes: int, per_class: int, shown: int = 10) -> tuple[np.ndarray, int]:
    """Indices and row length of a grid with one row per class: the first ``shown`` samples of each class
    of a request that lists ``per_class`` samples of class 0, then of class 1, ..."""
    shown = min(per_class, shown)
    keep = np.concatenate([np.arange(c * per_class, c * per_class + shown) for c in range(num_classes)])
    return keep, shown


def first_samples_grid(num_samples: int, per_class: int | None = None) -> tuple[np.ndarray, int | None]:
    """``st-ar sample``'s grid: the first 256 samples, a row per class when they come ``per_class`` at a time."""
    return np.arange(min(num_samples, GRID_LIMIT)), (per_class if per_class and per_class > 1 else None)


def check_request(classes: Sequence[int], model, vq=None) -> None:
    """Refuse classes the model does not have and a tokenizer whose codebook is not the GPT's vocabulary."""
    cfg = model.config
    if not len(classes):
        raise ValueError("no samples asked for")
    bad = [c for c in classes if not 0 <= c < cfg.num_classes]
    if bad:
        raise ValueError(
            f"class index {bad[0]} out of range: the model has {cfg.num_classes} classes (0..{cfg.num_classes - 1})"
        )
    if vq is not None and vq.config.codebook_size != cfg.vocab_size:
        raise ValueError(
            f"tokenizer codebook has {vq.config.codebook_size} codes but the GPT vocabulary is {cfg.vocab_size}: "
            "they were not trained together"
        )


def sample_to_files(
    model,
    vq,
    classes: Sequence[int],
    out: str | os.PathLike,
    settings: SampleSettings,
    info: DistInfo | None = None,
    *,
    grid: tuple[np.ndarray, int | None] | None = None,
    desc: str = "sampling",
) -> SampleReport:
    """Sample ``classes`` (one sample per entry) on every process of ``info`` and write the files to ``out``
    on rank 0. ``vq`` None writes codes.npy only. ``grid``: (indices, images per row) of grid.png, default
    ``first_samples_grid``. Call it on every rank; model and tokenizer on ``info.device``."""
    info = info or DistInfo()
    out = os.fspath(out)
    check_request(classes, model, vq)
    if settings.seeding == "stream" and info.distributed:
        raise ValueError("stream seeding draws every batch from one generator: it runs on one process only")
    parts_dir = os.path.join(out, "parts")
    start = time.perf_counter()
    own = sample_own_batches(model, vq, classes, settings, info, desc=desc)
    if info.distributed:
        os.makedirs(parts_dir, exist_ok=True)
        if not info.is_main:  # rank 0 keeps its share in memory
            write_part(os.path.join(parts_dir, f"rank{info.rank}.npz"), own)
    barrier()  # every part is on disk
    seconds = time.perf_counter() - start
    if not info.is_main:
        return SampleReport(len(classes), seconds, [])
    others = (read_part(os.path.join(parts_dir, f"rank{r}.npz")) for r in range(1, info.world_size))
    codes, images = merge_parts(chain([own], others), len(classes))  # parts read one at a time
    labels = np.asarray(classes, dtype=np.int64)
    written = write_outputs(out, codes, images, labels, grid or first_samples_grid(len(classes)))
    shutil.rmtree(parts_dir, ignore_errors=True)
    return SampleReport(len(classes), seconds, written)


def sample_own_batches(
    model, vq, classes: Sequence[int], settings: SampleSettings, info: DistInfo, *, desc: str = "sampling"
) -> Part:
    """Generate this rank's global batches; returns their global indices, codes and images."""
    size = settings.batch_size
    if settings.seeding == "stream":
        labels = list(classes)
        mine = range(-(-len(labels) // size))
        stream = torch.Generator(info.device).manual_seed(settings.seed)
    else:
        labels = padded_labels(classes, size * info.world_size)
        mine = rank_batches(len(labels) // size, info)
    indices, codes, images = [], [], []
    # rank 0's bar counts its own samples times the number of processes, capped at the request
    with progress_bar(total=len(classes), unit="img", desc=desc, disable=not info.is_main) as bar:
        for j in mine:
            batch = labels[j * size : (j + 1) * size]
            if settings.seeding == "stream":
                generator = stream
            else:
                generator = torch.Generator(info.device).manual_seed(batch_seed(settings.seed, j))
            batch_codes, batch_images = generate_images(
                model,
                vq,
                torch.tensor(batch, dtype=torch.long, device=info.device),
                batch_size=size,
                generator=generator,
                compile=settings.compile,
                **settings.generate_kwargs(),
            )
            indices.append(np.arange(j * size, j * size + len(batch), dtype=np.int64))
            codes.append(batch_codes.numpy().astype(np.int64))
            if batch_images is not None:
                images.append(batch_images)
            bar.update(min(len(batch) * info.world_size, bar.total - bar.n))
    return np.concatenate(indices), np.concatenate(codes), (np.concatenate(images) if images else None)


def write_part(path: str, part: Part) -> None:
    indices, codes, images = part
    arrays = {"indices": indices, "codes": codes}
    if images is not None:
        arrays["images"] = images
    atomic_write(path, lambda f: np.savez(f, **arrays))


def read_part(path: str) -> Part:
    with np.load(path) as z:
        return z["indices"], z["codes"], (z["images"] if "images" in z.files else None)


def merge_parts(parts: Iterable[Part], n: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Place every part's rows at their global index, keeping the first ``n`` (the rest is padding).

    Fills preallocated arrays part by part, so only one part besides the result is held at a time
    (``parts`` may load them lazily).
    """
    codes = images = None
    filled = np.zeros(n, dtype=bool)
    for indices, part_codes, part_images in parts:
        if codes is None:  # every rank runs at least one batch, so the first part has rows
            codes = np.empty((n, *part_codes.shape[1:]), dtype=np.int64)
            if part_images is not None:
                images = np.empty((n, *part_images.shape[1:]), dtype=np.uint8)
        keep = indices < n
        codes[indices[keep]] = part_codes[keep]
        if images is not None:
            images[indices[keep]] = part_images[keep]
        filled[indices[keep]] = True
    if not filled.all():
        raise RuntimeError(f"samples missing from the parts: first missing index {int(np.argmin(filled))}")
    return codes, images


def write_outputs(
    out: str,
    codes: np.ndarray,
    images: np.ndarray | None,
    labels: np.ndarray,
    grid: tuple[np.ndarray, int | None],
) -> list[str]:
    """codes.npy and, with images, samples.npz and grid.png (``grid``: indices and images per row);
    each file appears whole or not at all. Returns the names written."""
    atomic_write(os.path.join(out, "codes.npy"), lambda f: np.save(f, codes))
    written = ["codes.npy"]
    if images is not None:
        # arr_0 first: readers that take the first array of the file get the images
        atomic_write(os.path.join(out, "samples.npz"), lambda f: np.savez(f, arr_0=images, labels=labels))
        keep, nrow = grid
        tiled = Image.fromarray(make_grid(images[keep], nrow))
        atomic_write(os.path.join(out, "grid.png"), lambda f: tiled.save(f, format="PNG"))
        written += ["samples.npz", "grid.png"]
    return written
