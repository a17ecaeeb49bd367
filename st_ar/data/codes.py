"""Pre-extracting VQ codes (LlamaGen's recipe): every image is ADM-centre-cropped to crop_range x the target
size, cut into its ten crops, and every crop is tokenized once, before any GPT training.

An extraction folder holds

    codes.npy    (N, R * C, T) uint16 (int32 when the codebook exceeds 65536), a standard .npy read with
                 mmap_mode="r": codes[i, r * C + c] is crop c (order in meta["crop_names"]) of crop range r
                 (meta["crop_ranges"]) of image i, as T = h * w codes in raster order.
    labels.npy   (N,) int64 class labels; -1 marks an image skipped as corrupt (on_corrupt="skip").
    meta.json    tokenizer sha256 + config, grid, vocabulary, crops, ranges, image size, dataset, split, count,
                 dtype, format version, and "complete" once every chunk is written.
    done/        while running: one marker per finished chunk (removed when complete).

Work is split into chunks of ``chunk_size`` consecutive images. Under torchrun the chunks not yet done are
dealt round-robin to the ranks; every rank writes its rows straight into the shared memory-mapped files,
and batches never straddle chunks, so each image is encoded in the same batch whatever the number of
processes: the files are byte-identical to a one-process run. A chunk's marker is written only after its
rows are flushed to disk, so a killed run resumes where it stopped (settings must match: meta.json).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..distributed import DistInfo, barrier, broadcast_from_main
from ..models.vq import VQModel
from ..runfolder import (
    NoSpaceError,
    free_bytes,
    is_disk_full,
    lock_run_folder,
    megabytes,
    remove_stale_temp_files,
    write_json_atomic,
)
from ..settings import resume_differences
from .datasets import CorruptImageError, ImageDataset
from .transforms import CROP_SETS, crops_for_extraction, uint8_to_unit

CODES_FORMAT = "st-ar-codes"
CODES_VERSION = 1
DEFAULT_CHUNK_SIZE = 1024
# meta.json keys that may differ between a run and the one it resumes (everything else must match)
RESUME_FREE_KEYS = ("complete", "skipped", "skipped_count", "on_corrupt", "tokenizer_path")


class ExtractionStopped(RuntimeError):
    """Raised by ``stop_after_chunks`` (a testing hook that simulates a killed run)."""


class ExtractReport(NamedTuple):
    num_chunks: int  # in the whole extraction
    already_done: int  # chunks found finished when this run started
    encoded_chunks: int  # chunks this rank encoded
    encoded_images: int  # images this rank encoded (or found corrupt)
    skipped: list[str]  # corrupt paths this rank skipped
    seconds: float


# --------------------------------------------------------------------------------------------------
# Reading an extraction folder
# --------------------------------------------------------------------------------------------------


def read_codes_meta(folder: str | os.PathLike, *, require_complete: bool = True) -> dict[str, Any]:
    """meta.json of an extraction folder, checked to be ours (and finished, unless told otherwise)."""
    path = os.path.join(folder, "meta.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{folder} is not a code extraction folder (no meta.json); run `st-ar extract` first")
    with open(path) as f:
        meta = json.load(f)
    if meta.get("format") != CODES_FORMAT:
        raise ValueError(f"{path} is not an st-ar code extraction (format {meta.get('format')!r})")
    if meta.get("version", 0) > CODES_VERSION:
        raise ValueError(f"{path} has format version {meta['version']}; this st-ar reads up to {CODES_VERSION}")
    if require_complete and not meta.get("complete"):
        raise ValueError(f"extraction in {folder} is unfinished; run the same `st-ar extract` command again to resume")
    return meta


def read_codes_labels(folder: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """(rows, labels) of an extraction folder: the rows of codes.npy that hold an image (images skipped as
    corrupt, label -1, are left out) and those images' int64 labels."""
    labels = np.load(os.path.join(folder, "labels.npy"))
    rows = np.flatnonzero(labels >= 0)
    return rows, labels[rows].astype(np.int64)


def map_codes(folder: str | os.PathLike) -> np.ndarray:
    """codes.npy of an extraction folder, memory-mapped read-only: (N, num_crops, T)."""
    return np.load(os.path.join(folder, "codes.npy"), mmap_mode="r")


def check_codes_match(meta: dict[str, Any], vocab_size: int, block_size: int, num_classes: int | None = None) -> None:
    """Refuse, before training starts, codes that do not fit the model (a GPT would index out of range or
    learn the wrong grid)."""
    if meta["vocab_size"] != vocab_size:
        raise ValueError(
            f"codes use vocabulary {meta['vocab_size']}, model {vocab_size}: extract the codes with the tokenizer "
            f"the model is meant for, or set the model's vocab_size to {meta['vocab_size']}"
        )
    if num_classes is not None and meta.get("num_classes") is not None and meta["num_classes"] > num_classes:
        raise ValueError(
            f"codes have {meta['num_classes']} classes but the model only {num_classes}: set the model's "
            f"num_classes to at least {meta['num_classes']} (model.args)"
        )
    if meta["seq_len"] != block_size:
        h, w = meta["grid"]
        raise ValueError(
            f"sequence length {meta['seq_len']} ({h}x{w} grid at image size {meta['image_size']}) vs model "
            f"block_size {block_size}"
        )


# What makes two extraction folders the same codes: a resumed run must train on the codes it started
# on (a copy moved to another path is fine; another tokenizer, dataset or split is not).
CODES_IDENTITY_KEYS = (
    "tokenizer_sha256",
    "dataset",
    "split",
    "count",
    "num_classes",
    "image_size",
    "crop_ranges",
    "crops",
    "grid",
    "vocab_size",
)


def codes_identity(meta: dict[str, Any]) -> dict[str, Any]:
    return {k: meta.get(k) for k in CODES_IDENTITY_KEYS}


def codes_identity_differences(stored: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """'key: stored vs current' for every identity key on which two extraction folders differ."""
    return [
        f"{k}: {_short(stored.get(k))} in the run, {_short(current.get(k))} now"
        for k in CODES_IDENTITY_KEYS
        if stored.get(k) != current.get(k)
    ]


def codes_dtype(codebook_size: int) -> np.dtype:
    """uint16 holds codebooks up to 65536 entries (VQ-16's 16384 fits); int32 otherwise."""
    return np.dtype(np.uint16 if codebook_size <= 65536 else np.int32)


def file_sha256(path: str | os.PathLike, block: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            digest.update(chunk)
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------------
# Extraction
# --------------------------------------------------------------------------------------------------


class _Crops(Dataset):
    """Dataset index -> every crop to encode, as uint8 (K, H, W, 3) with K = ranges x crops. Runs in the
    DataLoader workers, so all PIL work is parallel. A corrupt file comes back as a flag, not an exception,
    so the main process decides (and its error names the file instead of a worker traceback)."""

    def __init__(self, dataset: ImageDataset, image_size: int, crop_ranges: Sequence[float], crops: str):
        self.dataset, self.image_size, self.crop_ranges, self.crops = dataset, image_size, list(crop_ranges), crops
        self.num_crops = len(self.crop_ranges) * len(CROP_SETS[crops])

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        try:
            img, label = self.dataset.read(i)
        except CorruptImageError as e:
            blank = np.zeros((self.num_crops, self.image_size, self.image_size, 3), np.uint8)
            return torch.from_numpy(blank), i, -1, e.path, e.reason
        crops = [c for r in self.crop_ranges for c in crops_for_extraction(img, self.image_size, r, self.crops)]
        pixels = np.stack([np.asarray(c) for c in crops])  # (K, H, W, 3) uint8
        return torch.from_numpy(pixels), i, label, "", ""


def _collate(items):
    pixels, index, label, path, error = zip(*items)
    return torch.stack(pixels), list(index), list(label), list(path), list(error)


def tokenize_crops(vq: VQModel, pixels: torch.Tensor) -> torch.Tensor:
    """(B, K, H, W, 3) uint8 -> (B, K, T) int64 codes, all B * K crops in one encoder batch."""
    b, k, h, w, _ = pixels.shape
    x = uint8_to_unit(pixels.reshape(b * k, h, w, 3).permute(0, 3, 1, 2)).contiguous()  # (B*K, 3, H, W)
    return vq.encode(x).reshape(b, k, -1)  # (B, K, T)


def build_meta(
    *,
    dataset: ImageDataset,
    count: int,
    vq: VQModel,
    tokenizer_sha256: str,
    tokenizer_path: str,
    image_size: int,
    crop_ranges: Sequence[float],
    crops: str,
    chunk_size: int,
    on_corrupt: str,
) -> dict[str, Any]:
    f = vq.config.downsample_factor
    grid = [image_size // f, image_size // f]
    crop_names = list(CROP_SETS[crops])
    meta = {
        "format": CODES_FORMAT,
        "version": CODES_VERSION,
        "dataset": dataset.name,
        "split": dataset.split,
        "count": count,
        "num_classes": dataset.num_classes,
        "classes": list(dataset.classes),
        "image_size": image_size,
        "crop_ranges": [float(r) for r in crop_ranges],
        "crops": crops,
        "crop_names": crop_names,
        "crops_per_range": len(crop_names),
        "num_crops": len(crop_names) * len(crop_ranges),
        "crop_layout": "codes[i, r * crops_per_range + c] = crop crop_names[c] at crop_ranges[r] of image i",
        "grid": grid,
        "seq_len": grid[0] * grid[1],
        "vocab_size": vq.config.codebook_size,
        "dtype": codes_dtype(vq.config.codebook_size).name,
        "tokenizer_sha256": tokenizer_sha256,
        "tokenizer_path": os.path.abspath(tokenizer_path),
        "tokenizer_config": dataclasses.asdict(vq.config),
        "chunk_size": chunk_size,
        "num_chunks": math.ceil(count / chunk_size),
        "on_corrupt": on_corrupt,
        "complete": False,
    }
    return json.loads(json.dumps(meta))  # JSON types (tuples -> lists) so it compares equal to a reread meta.json


def _meta_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """'key: old in the folder, new now' for every differing key; nested dicts (the tokenizer config) by field."""
    return [
        f"{k}: {_short(a)} in the folder, {_short(b)} now" for k, a, b in resume_differences(old, new, RESUME_FREE_KEYS)
    ]


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _write_json(path: str, obj: Any) -> None:
    write_json_atomic(path, obj, indent=1)  # a full disk: NoSpaceError naming the folder


def _arrays_ok(out: str, meta: dict[str, Any]) -> bool:
    shape = (meta["count"], meta["num_crops"], meta["seq_len"])
    try:
        codes = np.load(os.path.join(out, "codes.npy"), mmap_mode="r")
        labels = np.load(os.path.join(out, "labels.npy"), mmap_mode="r")
    except (OSError, ValueError):
        return False
    return codes.shape == shape and codes.dtype.name == meta["dtype"] and labels.shape == (meta["count"],)


def _prepare_folder(out: str, meta: dict[str, Any], labels: np.ndarray) -> str:
    """On rank 0: create the output files, or check that the folder can be resumed. Returns "fresh",
    "resume" or "complete"; raises ValueError when the folder holds an extraction with other settings."""
    meta_path = os.path.join(out, "meta.json")
    if os.path.isfile(meta_path):
        old = read_codes_meta(out, require_complete=False)
        diffs = _meta_differences(old, meta)
        if diffs:
            raise ValueError(
                f"{out} holds an extraction with different settings, so it cannot be resumed:\n  "
                + "\n  ".join(diffs)
                + "\nUse another --out folder, or delete this one to start over."
            )
        if old.get("complete"):
            return "complete"
        if _arrays_ok(out, meta):
            # a folder from before blocks were reserved at creation holds a sparse codes.npy
            reserve_blocks(os.path.join(out, "codes.npy"))
            return "resume"
        os.unlink(meta_path)  # meta.json without usable arrays: start over
    os.makedirs(out, exist_ok=True)
    shutil.rmtree(os.path.join(out, "done"), ignore_errors=True)
    shape = (meta["count"], meta["num_crops"], meta["seq_len"])
    codes_path = os.path.join(out, "codes.npy")
    free = free_bytes(out)
    try:
        codes = np.lib.format.open_memmap(codes_path, mode="w+", dtype=meta["dtype"], shape=shape)
        del codes  # sized (sparse) file with a standard header; ranks fill the rows
        reserve_blocks(codes_path, free)
        np.save(os.path.join(out, "labels.npy"), labels.astype(np.int64))
    except OSError as e:
        # nothing is in the new files yet, and without meta.json the folder is no extraction: free the space
        for name in ("codes.npy", "labels.npy"):
            if os.path.exists(os.path.join(out, name)):
                os.unlink(os.path.join(out, name))
        if isinstance(e, NoSpaceError):
            raise
        if is_disk_full(e, out):
            needed = int(np.prod(shape)) * np.dtype(meta["dtype"]).itemsize + labels.size * 8
            raise _no_space(out, "codes.npy and labels.npy", needed, free) from None
        raise
    os.makedirs(os.path.join(out, "done"), exist_ok=True)
    _write_json(meta_path, meta)  # last: its presence means the arrays exist
    return "fresh"


def reserve_blocks(path: str, free_before: int | None = None) -> None:
    """Allocate every block of ``path`` now, so that a full disk fails here, with an error naming the folder,
    and not later as SIGBUS when a write into the memory-mapped file finds no free block. Blocks already
    allocated are kept as they are (a resumed file keeps its rows).

    ``free_before``: the free space before a new file was created, so the error counts the whole file."""
    folder = os.path.dirname(os.path.abspath(path))
    size = os.path.getsize(path)
    if free_before is None:
        needed, free = max(0, size - os.stat(path).st_blocks * 512), free_bytes(folder)  # the holes left
    else:
        needed, free = size, free_before
    if hasattr(os, "posix_fallocate"):
        fd = os.open(path, os.O_RDWR)
        try:
            os.posix_fallocate(fd, 0, size)
            return
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise _no_space(folder, os.path.basename(path), needed, free) from None
            if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                raise
        finally:
            os.close(fd)
    # no way to reserve blocks here: at least refuse a file that cannot fit
    if free is not None and free < needed:
        raise _no_space(folder, os.path.basename(path), needed, free)


def _no_space(folder: str, what: str, needed: int, free: int | None) -> NoSpaceError:
    verb = "need" if " and " in what else "needs"
    return NoSpaceError(
        f"no space left on {folder}: {what} {verb} {megabytes(needed)}, {megabytes(free)} free; "
        "free space or use another --out",
        folder,
    )


def _marker(out: str, chunk: int) -> str:
    return os.path.join(out, "done", f"chunk-{chunk:07d}.json")


def _done_chunks(out: str) -> set[int]:
    folder = os.path.join(out, "done")
    if not os.path.isdir(folder):
        return set()
    return {int(n[6:-5]) for n in os.listdir(folder) if n.startswith("chunk-") and n.endswith(".json")}


def extract_codes(
    dataset: ImageDataset,
    vq_ckpt: str | os.PathLike,
    out: str | os.PathLike,
    *,
    image_size: int,
    vq_model: str | None = None,
    trust: bool = False,
    crop_ranges: Sequence[float] = (1.1,),
    crops: str = "ten",
    batch_size: int = 16,
    num_workers: int = 0,
    limit: int | None = None,
    on_corrupt: str = "fail",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    dist_info: DistInfo | None = None,
    progress: bool = True,
    stop_after_chunks: int | None = None,
) -> ExtractReport:
    """Tokenize every crop of the first ``limit`` images (all by default) of ``dataset`` into ``out``.

    Call it on every rank under torchrun (pass ``init_distributed()``'s DistInfo); alone it runs in one
    process. ``batch_size`` counts images: the encoder sees batch_size x len(crop_ranges) x crops-per-range
    crops at once. With on_corrupt="fail" a corrupt file stops the run with an error naming it; with "skip"
    its codes stay zero, its label becomes -1 and meta.json lists it.
    """
    info = dist_info or DistInfo()
    out = os.fspath(out)
    if crops not in CROP_SETS:
        raise ValueError(f"crops must be one of {', '.join(CROP_SETS)}, got {crops!r}")
    if on_corrupt not in ("fail", "skip"):
        raise ValueError(f"on_corrupt must be 'fail' or 'skip', got {on_corrupt!r}")
    if not crop_ranges or any(r < 1.0 for r in crop_ranges):
        raise ValueError(f"crop ranges must be >= 1.0, got {list(crop_ranges)}")
    if len(set(crop_ranges)) != len(crop_ranges):
        raise ValueError(f"crop ranges must be distinct, got {list(crop_ranges)}")
    if batch_size < 1 or chunk_size < 1:
        raise ValueError("batch_size and chunk_size must be >= 1")
    vq = VQModel.from_checkpoint(vq_ckpt, vq_model, trust=trust).to(info.device).eval()
    f = vq.config.downsample_factor
    if image_size < f or image_size % f:
        raise ValueError(f"image size {image_size} is not a multiple of the tokenizer's downsample factor {f}")
    count = len(dataset) if limit is None else min(limit, len(dataset))
    if count < 1:
        raise ValueError(f"nothing to extract: {dataset!r} with limit {limit}")

    # rank 0 holds the folder's lock until this call returns (a second extraction into `out` is refused),
    # and creates or checks the folder; the others learn the outcome, or the error, from it
    with contextlib.closing(lock_run_folder(out, "--out", info)):
        status = None
        if info.is_main:
            try:
                remove_stale_temp_files(out, os.path.join(out, "done"))
                meta = build_meta(
                    dataset=dataset,
                    count=count,
                    vq=vq,
                    tokenizer_sha256=file_sha256(vq_ckpt),
                    tokenizer_path=os.fspath(vq_ckpt),
                    image_size=image_size,
                    crop_ranges=crop_ranges,
                    crops=crops,
                    chunk_size=chunk_size,
                    on_corrupt=on_corrupt,
                )
                status = ("ok", _prepare_folder(out, meta, dataset.labels()[:count]), meta)
            except NoSpaceError as e:
                status = ("no space", str(e), None)
            except (ValueError, OSError) as e:
                status = ("error", f"{type(e).__name__}: {e}" if isinstance(e, OSError) else str(e), None)
        status = broadcast_from_main(status, info)
        if status[0] == "no space":
            raise NoSpaceError(status[1], out)
        if status[0] == "error":
            raise ValueError(status[1])
        _, state, meta = status
        start = time.perf_counter()
        if state == "complete":
            return ExtractReport(meta["num_chunks"], meta["num_chunks"], 0, 0, [], 0.0)

        num_chunks = meta["num_chunks"]
        done = _done_chunks(out)
        pending = [c for c in range(num_chunks) if c not in done]
        mine = pending[info.rank :: info.world_size]  # round-robin: every rank gets a share of what is left
        batches = [
            list(range(b, min(b + batch_size, (c + 1) * chunk_size, count)))
            for c in mine
            for b in range(c * chunk_size, min((c + 1) * chunk_size, count), batch_size)
        ]
        report = _encode_chunks(
            vq, dataset, out, meta, batches, info, num_workers, on_corrupt, progress, stop_after_chunks
        )
        barrier()
        if info.is_main:
            _finish(out, meta)
        barrier()
        return ExtractReport(num_chunks, len(done), *report, time.perf_counter() - start)


def _encode_chunks(vq, dataset, out, meta, batches, info, num_workers, on_corrupt, progress, stop_after_chunks):
    from ..progress import progress_bar

    chunk_size, count = meta["chunk_size"], meta["count"]
    codes = np.load(os.path.join(out, "codes.npy"), mmap_mode="r+")  # (N, K, T)
    labels = np.load(os.path.join(out, "labels.npy"), mmap_mode="r+")  # (N,)
    crops = _Crops(dataset, meta["image_size"], meta["crop_ranges"], meta["crops"])
    loader = DataLoader(
        crops,
        batch_sampler=batches,
        num_workers=num_workers,
        collate_fn=_collate,
        pin_memory=info.device.type == "cuda",
    )
    skipped, chunk_skipped = [], []
    encoded_chunks = encoded_images = 0
    total = sum(len(b) for b in batches)
    desc = "extract" if not info.distributed else f"extract (rank 0 of {info.world_size})"
    with progress_bar(
        total=total, unit="img", desc=desc, disable=not (progress and info.is_main), smoothing=0.1
    ) as bar:
        for pixels, index, label, path, error in loader:
            with torch.no_grad():
                batch_codes = tokenize_crops(vq, pixels.to(info.device, non_blocking=True)).cpu().numpy()
            for j, err in enumerate(error):
                if err:
                    if on_corrupt == "fail":
                        raise CorruptImageError(path[j], err)
                    batch_codes[j] = 0
                    chunk_skipped.append(path[j])
            lo, hi = index[0], index[-1] + 1  # batches are contiguous slices of one chunk
            codes[lo:hi] = batch_codes.astype(codes.dtype)
            labels[lo:hi] = label
            bar.update(hi - lo)
            encoded_images += hi - lo
            chunk = lo // chunk_size
            if hi == min((chunk + 1) * chunk_size, count):  # the chunk's last batch
                codes.flush()  # rows on disk before the marker says so
                labels.flush()
                _write_json(_marker(out, chunk), {"chunk": chunk, "rank": info.rank, "skipped": chunk_skipped})
                skipped += chunk_skipped
                chunk_skipped = []
                encoded_chunks += 1
                if stop_after_chunks is not None and encoded_chunks >= stop_after_chunks:
                    raise ExtractionStopped(f"stopped after {encoded_chunks} chunks (stop_after_chunks)")
    return encoded_chunks, encoded_images, skipped


def _finish(out: str, meta: dict[str, Any]) -> None:
    """Rank 0, after every rank is through: mark the extraction complete if no chunk is missing."""
    done = _done_chunks(out)
    if len(done) < meta["num_chunks"]:
        return  # some rank stopped early; a rerun finishes the job
    skipped = []
    for c in sorted(done):
        with open(_marker(out, c)) as f:
            skipped += json.load(f)["skipped"]
    _write_json(
        os.path.join(out, "meta.json"), {**meta, "complete": True, "skipped_count": len(skipped), "skipped": skipped}
    )
    shutil.rmtree(os.path.join(out, "done"), ignore_errors=True)
