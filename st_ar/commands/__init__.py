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


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(precision: str, device: torch.device) -> torch.dtype:
    """--precision (auto | fp32 | bf16) as the dtype to run in: the trainers' rule (runtime.resolve_precision)."""
    from ..train.runtime import resolve_precision

    return resolve_precision(precision, device) or torch.float32
