"""Sample class-conditional images from a GPT checkpoint (ours or LlamaGen's).

Writes DIR/codes.npy (int64, N x T, in the order of the classes asked) and, with a tokenizer,
DIR/samples.npz (uint8 N x H x W x 3 under "arr_0", the ADM evaluator's format, and the class of
every sample under "labels") and DIR/grid.png.

Runs alone or on several processes (``torchrun --nproc_per_node K -m st_ar.cli sample ...``):
--batch-size is per process, and sample i is the same on any number of processes.
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from collections.abc import Iterable
from itertools import chain

import numpy as np
import torch

from ..distributed import DistInfo, barrier, cleanup_distributed, init_distributed
from ..images import save_grid
from ..models.gpt import GPT
from ..models.vq import VQModel
from ..progress import progress_bar
from ..runfolder import atomic_write, prepare_output_dir
from ..sampling.generate import check_sampling_settings, generate_images
from . import int_list, json_object, resolve_dtype

HELP = "sample images from a GPT checkpoint"

# a part is (global indices (n,), codes (n, T), uint8 images (n, H, W, 3) or None)
Part = tuple[np.ndarray, np.ndarray, np.ndarray | None]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt", required=True, help="GPT checkpoint: ours, or LlamaGen's (then --model is needed)")
    p.add_argument("--model", help="GPT preset (GPT-B, GPT-L, ...); optional for our checkpoints")
    p.add_argument(
        "--model-args",
        type=json_object,
        default=None,
        metavar="JSON",
        help="LlamaGen ModelArgs fields overriding the preset, e.g. '{\"block_size\": 576}'",
    )
    p.add_argument("--vq-ckpt", help="VQ tokenizer checkpoint; without it only codes.npy is written")
    p.add_argument("--vq-model", help="VQ preset (VQ-16, VQ-8, ...); optional for our tokenizer checkpoints")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--classes", type=int_list, help="comma-separated class indices, e.g. 1,2,3")
    which.add_argument("--per-class", type=int, metavar="N", help="N samples of every class, in class order")
    p.add_argument(
        "--cfg-scale",
        type=float,
        default=1.0,
        help="classifier-free guidance, >= 0; 1 = off. LlamaGen's FID settings: 2.0 (B, L), 1.75 (XL, XXL)",
    )
    p.add_argument(
        "--cfg-interval",
        type=int,
        default=-1,
        help="guide only the first tokens (LlamaGen's convention: N guides tokens 0..N+1); -1 = all",
    )
    p.add_argument("--top-k", type=int, default=0, help=">= 0; 0 = no top-k filter, 1 = greedy")
    p.add_argument("--top-p", type=float, default=1.0, help="in (0, 1]; 1.0 = no nucleus filter")
    p.add_argument("--temperature", type=float, default=1.0, help=">= 0; 0 = greedy")
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="same seed and batch size give the same samples, on any number of processes "
        "(batch j of --batch-size samples draws from its own generator, seeded with (seed * 1000003 + j) mod 2^64)",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=32,
        help="samples per process and step; the request is rounded up to whole steps of every process "
        "and the extra samples dropped",
    )
    p.add_argument(
        "--device",
        default="auto",
        help="auto (cuda when available; under torchrun each rank's own GPU), cpu, cuda, cuda:1, ...",
    )
    p.add_argument(
        "--precision",
        choices=["auto", "fp32", "bf16"],
        default="auto",
        help="weights and activations; auto = bf16 on GPU, fp32 on CPU",
    )
    p.add_argument(
        "--trust-checkpoint",
        action="store_true",
        help="allow arbitrary pickled objects in checkpoint files (only for files you trust)",
    )
    p.add_argument("--out", required=True, help="output folder")


def run(args: argparse.Namespace) -> None:
    info = init_distributed(rank_device(args.device))
    try:
        sample(args, info)
    finally:
        cleanup_distributed()


def rank_device(name: str) -> str:
    # under torchrun a bare "cuda" would put every rank on GPU 0
    if name == "cuda" and "LOCAL_RANK" in os.environ:
        return f"cuda:{os.environ['LOCAL_RANK']}"
    return name


def batch_seed(seed: int, batch: int) -> int:
    """Seed of global batch ``batch``: depends on neither the rank nor the number of processes."""
    return (seed * 1_000_003 + batch) % 2**64


def padded_labels(classes: list[int], global_batch: int) -> list[int]:
    """``classes`` repeated cyclically up to a multiple of ``global_batch``, so every rank runs the same
    number of full batches (collectives and GPU throughput want equal, full batches)."""
    total = -(-len(classes) // global_batch) * global_batch
    return [classes[i % len(classes)] for i in range(total)]


def rank_batches(num_batches: int, info: DistInfo) -> range:
    """Global batches of this rank: round-robin, so rank r runs r, r + K, r + 2K, ..."""
    return range(info.rank, num_batches, info.world_size)


def sample(args: argparse.Namespace, info: DistInfo) -> None:
    # everything that can be told from the arguments alone, before minutes of loading and sampling
    check_sampling_settings(**sampling_settings(args))
    if args.per_class is not None and args.per_class < 1:
        raise ValueError(f"--per-class must be at least 1, got {args.per_class}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")
    prepare_output_dir(args.out, "--out")
    device = info.device
    dtype = resolve_dtype(args.precision, device)
    model = GPT.from_checkpoint(args.ckpt, args.model, model_args=args.model_args, trust=args.trust_checkpoint)
    model = model.to(device=device, dtype=dtype).eval()
    cfg = model.config
    classes = (
        args.classes if args.classes is not None else [c for c in range(cfg.num_classes) for _ in range(args.per_class)]
    )
    if not classes:
        raise ValueError("no samples asked for")
    bad = [c for c in classes if not 0 <= c < cfg.num_classes]
    if bad:
        raise ValueError(
            f"class index {bad[0]} out of range: the model has {cfg.num_classes} classes (0..{cfg.num_classes - 1})"
        )
    vq = None
    if args.vq_ckpt:
        vq = VQModel.from_checkpoint(args.vq_ckpt, args.vq_model, trust=args.trust_checkpoint).to(device).eval()
        if vq.config.codebook_size != cfg.vocab_size:
            raise ValueError(
                f"tokenizer codebook has {vq.config.codebook_size} codes but the GPT vocabulary is {cfg.vocab_size}: "
                "they were not trained together"
            )

    parts_dir = os.path.join(args.out, "parts")
    start = time.perf_counter()
    own = sample_own_batches(model, vq, classes, args, info)
    if info.distributed:
        os.makedirs(parts_dir, exist_ok=True)
        if not info.is_main:  # rank 0 keeps its share in memory
            write_part(os.path.join(parts_dir, f"rank{info.rank}.npz"), own)
    barrier()  # every part is on disk
    seconds = time.perf_counter() - start
    if not info.is_main:
        return
    others = (read_part(os.path.join(parts_dir, f"rank{r}.npz")) for r in range(1, info.world_size))
    parts = chain([own], others)  # read one at a time while merging
    codes, images = merge_parts(parts, len(classes))
    written = write_outputs(args, codes, images, np.asarray(classes, dtype=np.int64))
    shutil.rmtree(parts_dir, ignore_errors=True)
    on = f" on {info.world_size} processes" if info.distributed else ""
    print(
        f"{len(classes)} samples in {seconds:.1f} s ({len(classes) * cfg.block_size / seconds:.0f} tokens/s{on}); "
        f"wrote {', '.join(written)} to {args.out}"
    )


def sample_own_batches(model, vq, classes: list[int], args: argparse.Namespace, info: DistInfo) -> Part:
    """Generate this rank's global batches; returns their global indices, codes and images."""
    size = args.batch_size
    labels = padded_labels(classes, size * info.world_size)
    mine = rank_batches(len(labels) // size, info)
    indices, codes, images = [], [], []
    # rank 0's bar counts its own samples times the number of processes, capped at the request
    with progress_bar(total=len(classes), unit="img", desc="sampling", disable=not info.is_main) as bar:
        for j in mine:
            generator = torch.Generator(info.device).manual_seed(batch_seed(args.seed, j))
            batch_codes, batch_images = generate_images(
                model,
                vq,
                torch.tensor(labels[j * size : (j + 1) * size], dtype=torch.long, device=info.device),
                batch_size=size,
                generator=generator,
                **sampling_settings(args),
            )
            indices.append(np.arange(j * size, (j + 1) * size, dtype=np.int64))
            codes.append(batch_codes.numpy().astype(np.int64))
            if batch_images is not None:
                images.append(batch_images)
            bar.update(min(size * info.world_size, bar.total - bar.n))
    return np.concatenate(indices), np.concatenate(codes), (np.concatenate(images) if images else None)


def sampling_settings(args: argparse.Namespace) -> dict:
    """generate()'s keyword arguments from the command line."""
    return {
        "cfg_scale": args.cfg_scale,
        "cfg_interval": args.cfg_interval,
        "temperature": args.temperature,
        "top_k": args.top_k,
        "top_p": args.top_p,
    }


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


def write_outputs(args: argparse.Namespace, codes: np.ndarray, images: np.ndarray | None, labels: np.ndarray) -> list:
    """codes.npy and, with images, samples.npz and grid.png; each file appears whole or not at all."""
    atomic_write(os.path.join(args.out, "codes.npy"), lambda f: np.save(f, codes))
    written = ["codes.npy"]
    if images is not None:
        # arr_0 first: readers that take the first array of the file get the images
        atomic_write(os.path.join(args.out, "samples.npz"), lambda f: np.savez(f, arr_0=images, labels=labels))
        nrow = args.per_class if args.per_class and args.per_class > 1 else None
        save_grid(images[:256], os.path.join(args.out, "grid.png"), nrow=nrow)
        written += ["samples.npz", "grid.png"]
    return written
