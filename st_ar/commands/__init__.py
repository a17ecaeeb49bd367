"""Subcommands of ``st-ar``; each module has HELP, add_arguments(parser) and run(args).

The argument helpers below are shared by several commands.
"""

from __future__ import annotations

import argparse
import json

import torch


def json_object(text: str) -> dict:
    """argparse type: a JSON object, e.g. '{"block_size": 576}'."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object of field names and values, got {text!r}")
    return value


def int_list(text: str) -> list[int]:
    """argparse type: comma-separated integers, e.g. 1,2,3."""
    parts = [x.strip() for x in text.split(",")]
    if not all(parts):  # "1,,2", "1,2,", ",", "": a value was left out
        raise argparse.ArgumentTypeError(f"expected comma-separated integers with none left empty, got {text!r}")
    try:
        return [int(x) for x in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def add_device_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--device",
        default="auto",
        help="auto (this process's GPU when CUDA is available, else the CPU), cpu, cuda, cuda:1, ...; "
        "under torchrun a bare cuda means each rank's own GPU",
    )


def add_precision_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--precision",
        choices=["auto", "fp32", "bf16"],
        default="auto",
        help="weights and activations; auto = bf16 on GPU, fp32 on CPU",
    )


def add_trust_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--trust-checkpoint",
        action="store_true",
        help="allow arbitrary pickled objects in checkpoint files (only for files you trust)",
    )


def add_gpt_arguments(p: argparse.ArgumentParser, *, several: bool = False) -> None:
    """--ckpt (repeatable with ``several``), --model and --model-args: which GPT to load and how."""
    if several:
        p.add_argument("--ckpt", action="append", required=True, help="GPT checkpoint; repeat to compare models")
    else:
        p.add_argument("--ckpt", required=True, help="GPT checkpoint: ours, or LlamaGen's (then --model is needed)")
    p.add_argument("--model", help="GPT preset (GPT-B, GPT-L, ...); needed for LlamaGen checkpoints only")
    p.add_argument(
        "--model-args",
        type=json_object,
        default=None,
        metavar="JSON",
        help="LlamaGen ModelArgs fields overriding the preset, e.g. '{\"block_size\": 576}'",
    )


def load_gpt(args: argparse.Namespace, ckpt: str, device: torch.device):
    """The GPT of ``ckpt`` as --model, --model-args, --precision and --trust-checkpoint say, in eval mode.

    --precision follows the trainers' rule (runtime.resolve_precision); None there means fp32 here.
    """
    from ..models.gpt import GPT
    from ..train.runtime import resolve_precision

    model = GPT.from_checkpoint(ckpt, args.model, model_args=args.model_args, trust=args.trust_checkpoint)
    dtype = resolve_precision(args.precision, device) or torch.float32
    return model.to(device=device, dtype=dtype).eval()
