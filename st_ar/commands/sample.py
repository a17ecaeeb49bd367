"""Sample class-conditional images from a GPT checkpoint (ours or LlamaGen's).

Writes DIR/codes.npy (int64, N x T, in the order of the classes asked) and, with a tokenizer,
DIR/samples.npz (uint8 N x H x W x 3 under "arr_0", the ADM evaluator's format, and the class of
every sample under "labels") and DIR/grid.png.

Runs alone or on several processes (``torchrun --nproc_per_node K -m st_ar.cli sample ...``):
--batch-size is per process, and sample i is the same on any number of processes. The sampling and the
files are st_ar/sampling/to_file.py's; this module reads the arguments and loads the checkpoints.
"""

from __future__ import annotations

import argparse

from ..distributed import DistInfo, cleanup_distributed, init_distributed
from ..models.quantize import fp16_weight_kernel_available, pack_fp16_weights
from ..models.vq import VQModel
from ..runfolder import prepare_output_dir
from ..sampling.to_file import SampleSettings, check_request, first_samples_grid, sample_to_files
from . import add_device_argument, add_gpt_arguments, add_precision_argument, add_trust_argument, int_list, load_gpt

HELP = "sample images from a GPT checkpoint"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_gpt_arguments(p)
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
        "--compile",
        action="store_true",
        help="compile the decode step once for every position (CUDA graphs on GPU); pays a compile first",
    )
    p.add_argument(
        "--fp16-weights",
        action="store_true",
        help="CPU only: keep the block and head weights as fp16, packed once (activations stay fp32); "
        "decodes faster where the step is bound by reading weights (docs/performance.md)",
    )
    add_device_argument(p)
    add_precision_argument(p)
    add_trust_argument(p)
    p.add_argument("--out", required=True, help="output folder")


def run(args: argparse.Namespace) -> None:
    info = init_distributed(args.device)
    try:
        sample(args, info)
    finally:
        cleanup_distributed()


def sample_settings(args: argparse.Namespace) -> SampleSettings:
    """The sampling settings of the command line (checked: a bad value is refused here)."""
    return SampleSettings(
        cfg_scale=args.cfg_scale,
        cfg_interval=args.cfg_interval,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        batch_size=args.batch_size,
        seed=args.seed,
        compile=args.compile,
    )


def check_fp16_weights(args: argparse.Namespace, device) -> None:
    """--fp16-weights asks for fbgemm's CPU kernel under an eager fp32 decode: refuse what cannot go with it."""
    if device.type != "cpu":
        raise ValueError(f"--fp16-weights is a CPU route (device {device}); on a GPU use --precision bf16")
    if args.precision == "bf16":
        raise ValueError("--fp16-weights keeps fp32 activations: drop --precision bf16 (or --fp16-weights)")
    if args.compile:
        raise ValueError("--fp16-weights decodes eagerly: drop --compile (or --fp16-weights)")
    if not fp16_weight_kernel_available():
        raise ValueError("this torch build has no fbgemm fp16-weight linear: sample without --fp16-weights")


def sample(args: argparse.Namespace, info: DistInfo) -> None:
    # everything that can be told from the arguments alone, before minutes of loading and sampling
    if args.per_class is not None and args.per_class < 1:
        raise ValueError(f"--per-class must be at least 1, got {args.per_class}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")
    settings = sample_settings(args)
    device = info.device
    if args.fp16_weights:
        check_fp16_weights(args, device)
    prepare_output_dir(args.out, "--out")
    model = load_gpt(args, args.ckpt, device)
    if args.fp16_weights:
        pack_fp16_weights(model)
    cfg = model.config
    classes = (
        args.classes if args.classes is not None else [c for c in range(cfg.num_classes) for _ in range(args.per_class)]
    )
    check_request(classes, model)  # before the tokenizer is read
    vq = None
    if args.vq_ckpt:
        vq = VQModel.from_checkpoint(args.vq_ckpt, args.vq_model, trust=args.trust_checkpoint).to(device).eval()
    grid = first_samples_grid(len(classes), args.per_class)
    report = sample_to_files(model, vq, classes, args.out, settings, info, grid=grid)
    if not info.is_main:
        return
    on = f" on {info.world_size} processes" if info.distributed else ""
    print(
        f"{report.samples} samples in {report.seconds:.1f} s "
        f"({report.samples * cfg.block_size / report.seconds:.0f} tokens/s{on}); "
        f"wrote {', '.join(report.written)} to {args.out}"
    )
