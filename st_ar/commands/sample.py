"""Sample class-conditional images from a GPT checkpoint (ours or LlamaGen's).

Writes DIR/codes.npy (int64, N x T, in the order of the classes asked) and, with a tokenizer,
DIR/samples.npz (uint8 N x H x W x 3 under "arr_0", the ADM evaluator's format) and DIR/grid.png.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch
from tqdm import tqdm

from ..images import save_grid, to_uint8
from ..models.gpt import GPT
from ..models.vq import VQModel
from ..sampling import generate
from . import int_list, json_object, resolve_device, resolve_dtype

HELP = "sample images from a GPT checkpoint"


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
        help="classifier-free guidance; 1 = off. LlamaGen's FID settings: 2.0 (B, L), 1.75 (XL, XXL)",
    )
    p.add_argument(
        "--cfg-interval",
        type=int,
        default=-1,
        help="guide only the first tokens (LlamaGen's convention: N guides tokens 0..N+1); -1 = all",
    )
    p.add_argument("--top-k", type=int, default=0, help="0 = no top-k filter")
    p.add_argument("--top-p", type=float, default=1.0, help="1.0 = no nucleus filter")
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    p.add_argument("--seed", type=int, default=0, help="same seed and batch size give the same samples")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1, ...")
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
    device = resolve_device(args.device)
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

    os.makedirs(args.out, exist_ok=True)
    generator = torch.Generator(device).manual_seed(args.seed)
    labels = torch.tensor(classes, dtype=torch.long, device=device)
    codes, images = [], []
    start = time.perf_counter()
    with tqdm(total=len(classes), unit="img", desc="sampling") as bar:
        for i in range(0, len(classes), args.batch_size):
            batch = generate(
                model,
                labels[i : i + args.batch_size],
                cfg_scale=args.cfg_scale,
                cfg_interval=args.cfg_interval,
                temperature=args.temperature,
                top_k=args.top_k,
                top_p=args.top_p,
                generator=generator,
            )  # (b, T)
            codes.append(batch.cpu())
            if vq is not None:
                with torch.no_grad():
                    images.append(to_uint8(vq.decode(batch, grid=(cfg.grid_size, cfg.grid_size))))
            bar.update(batch.shape[0])
    seconds = time.perf_counter() - start
    codes = torch.cat(codes).numpy().astype(np.int64)
    np.save(os.path.join(args.out, "codes.npy"), codes)
    written = ["codes.npy"]
    if vq is not None:
        images = np.concatenate(images)
        np.savez(os.path.join(args.out, "samples.npz"), arr_0=images)
        nrow = args.per_class if args.per_class and args.per_class > 1 else None
        save_grid(images[:256], os.path.join(args.out, "grid.png"), nrow=nrow)
        written += ["samples.npz", "grid.png"]
    print(
        f"{len(classes)} samples in {seconds:.1f} s ({len(classes) * cfg.block_size / seconds:.0f} tokens/s); "
        f"wrote {', '.join(written)} to {args.out}"
    )
