"""Tokenize a dataset's crops once, for GPT training (LlamaGen's pre-extraction).

Every image is ADM-centre-cropped to crop-range x image-size, ten-cropped (or five / centre), and each
crop is VQ-encoded. Writes OUT/codes.npy ((N, ranges x crops, T) uint16, memory-mappable), OUT/labels.npy
and OUT/meta.json; see st_ar/data/codes.py and docs/data.md. Several processes: launch with
`torchrun --nproc_per_node N -m st_ar.cli extract ...`. A killed run resumes when run again with the same
arguments.
"""

from __future__ import annotations

import argparse
import os

from ..data.codes import DEFAULT_CHUNK_SIZE, ExtractionStopped, extract_codes
from ..data.datasets import open_dataset
from ..data.transforms import CROP_SETS
from ..distributed import cleanup_distributed, init_distributed, print0
from . import add_device_argument, add_trust_argument

HELP = "tokenize every crop of a dataset into a memory-mapped codes array"
# Testing hook: stop (as if killed) after this many chunks of this process are written.
STOP_ENV = "ST_AR_EXTRACT_STOP_AFTER"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", required=True, help="mnist, fashion-mnist, or an image folder (PATH or folder:PATH)")
    p.add_argument("--split", default="train", help="train, test or val (folders: see docs/data.md)")
    p.add_argument("--data-root", help="where the MNIST / Fashion-MNIST files are, if not in their default place")
    p.add_argument("--vq-ckpt", required=True, help="VQ tokenizer checkpoint (ours, or LlamaGen's with --vq-model)")
    p.add_argument("--vq-model", help="VQ preset (VQ-16, VQ-8, ...); optional for our tokenizer checkpoints")
    p.add_argument("--image-size", type=int, required=True, help="crop side in pixels; a multiple of the VQ downsample")
    p.add_argument(
        "--crop-range",
        type=float,
        action="append",
        dest="crop_ranges",
        metavar="R",
        help="centre crop to R x image-size before cropping (default 1.1); repeat for several sets, e.g. "
        "--crop-range 1.1 --crop-range 1.05 as LlamaGen",
    )
    p.add_argument("--crops", choices=list(CROP_SETS), default="ten", help="crops per image and range (default ten)")
    p.add_argument(
        "--batch-size",
        type=int,
        default=16,
        help="images per encoder batch (x crops x ranges crops); VQ-16 at 256 px: ~130 MB of GPU memory per crop",
    )
    p.add_argument("--num-workers", type=int, default=min(8, os.cpu_count() or 1), help="DataLoader workers (PIL work)")
    p.add_argument("--limit", type=int, help="only the first N images of the split")
    p.add_argument(
        "--chunk-size",
        type=int,
        default=DEFAULT_CHUNK_SIZE,
        help="images per resumable unit of work (a killed run redoes at most one chunk per process)",
    )
    p.add_argument(
        "--on-corrupt",
        choices=["fail", "skip"],
        default="fail",
        help="an unreadable image: stop with its path (fail), or leave it out, listed in meta.json (skip)",
    )
    add_device_argument(p)
    add_trust_argument(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--out", required=True, help="output folder")


def run(args: argparse.Namespace) -> None:
    info = init_distributed(args.device)
    try:
        dataset = open_dataset(args.dataset, args.split, root=args.data_root, on_corrupt=args.on_corrupt)
        stop = os.environ.get(STOP_ENV)
        report = extract_codes(
            dataset,
            args.vq_ckpt,
            args.out,
            image_size=args.image_size,
            vq_model=args.vq_model,
            trust=args.trust_checkpoint,
            crop_ranges=args.crop_ranges or [1.1],
            crops=args.crops,
            batch_size=args.batch_size,
            num_workers=args.num_workers,
            limit=args.limit,
            on_corrupt=args.on_corrupt,
            chunk_size=args.chunk_size,
            dist_info=info,
            progress=not args.no_progress,
            stop_after_chunks=int(stop) if stop else None,
        )
    except ExtractionStopped as e:
        print(f"rank {info.rank}: {e}", flush=True)
        raise SystemExit(3) from None
    finally:
        cleanup_distributed()
    # every rank reports what it did, so a log shows which chunks a resumed run redid
    rate = report.encoded_images / report.seconds if report.seconds else 0.0
    print(
        f"rank {info.rank}: encoded {report.encoded_chunks} chunk(s), {report.encoded_images} images "
        f"({rate:.1f} img/s); {report.already_done} of {report.num_chunks} chunks were already done",
        flush=True,
    )
    if report.skipped:
        print(f"rank {info.rank}: skipped {len(report.skipped)} corrupt image(s), e.g. {report.skipped[0]}", flush=True)
    print0(f"wrote {args.out}/codes.npy, labels.npy, meta.json")
