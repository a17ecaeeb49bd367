"""What every trainer here needs besides its model and its step: the GPT trainer (loop.py) and
the tokenizer trainer (st_ar/tokenizer/train.py) both run on these, so they resume, stop and
refuse in the same way.

- ``autocast_for(precision, device)``: train.precision / precision ("auto": bf16 on CUDA, fp32 on CPU);
- ``param_groups(module, weight_decay, exclude=...)``: weight decay on >= 2-D weights only;
- ``check_finite(...)``: every rank stops at the same step when any rank's loss or gradient is NaN/inf;
- ``capture_rng`` / ``restore_rng``: every rank's random streams in a checkpoint, and back; a run
  resumed on another number of processes is refused (its data order and streams would not continue);
- ``check_resumable(stored, config, path)``: the settings a resumed run may change are the config's
  ``CHANGEABLE_ON_RESUME``; anything else is refused with the list of differences;
- ``checkpoint_path(folder)``: FOLDER/checkpoints/last.pt; a run whose folder holds one resumes from
  it by itself.

The batch order is train/sampler.py's ``StepBatches``, the EMA update and its schedules teacher.py's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..distributed import DistInfo
from ..models.loading import CheckpointError
from ..settings import resume_differences, with_defaults
from . import NonFiniteLoss

CHECKPOINT_NAME = "last.pt"
PRECISIONS = ("auto", "fp32", "bf16")


def checkpoint_path(folder: str) -> str:
    """The checkpoint a run in ``folder`` resumes from."""
    return os.path.join(folder, "checkpoints", CHECKPOINT_NAME)


# ----------------------------------------------------------------------------- precision


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``precision`` on ``device``; None: plain fp32."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return torch.bfloat16 if precision == "bf16" else None


def autocast_for(precision: str, device: torch.device) -> Callable[[], contextlib.AbstractContextManager]:
    """() -> the context that runs a forward at ``precision`` (no-op for fp32)."""
    dtype = resolve_precision(precision, device)

    def autocast():
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=dtype)

    return autocast


# ----------------------------------------------------------------------------- optimizer


def param_groups(module: nn.Module, weight_decay: float, exclude: Iterable[str] = ()) -> list[dict]:
    """Weight decay on trainable weights with >= 2 dims (linears, convs, embeddings), except those
    whose name contains one of ``exclude``; none on norms and biases."""
    exclude = tuple(exclude)
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 and not any(e in name for e in exclude) else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# ----------------------------------------------------------------------------- finite losses


def check_finite(
    values: Iterable[torch.Tensor | float],
    *,
    step: int,
    detail: Callable[[], str],
    device: torch.device,
    error: type[NonFiniteLoss] = NonFiniteLoss,
) -> None:
    """Raise ``error`` on every rank when any value on any rank is NaN or infinite.

    ``step`` is the number of steps done before this one (the error names step + 1, as logs and
    checkpoints number it); ``detail()`` says what the values were. A collective under torchrun.
    """
    ok = all(bool(torch.isfinite(torch.as_tensor(v)).all()) for v in values)
    flag = torch.tensor([1.0 if ok else 0.0], device=device)
    if dist.is_initialized():
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    if flag.item() < 1:
        raise error(f"non-finite loss or gradient at step {step + 1} ({detail()})")


# ----------------------------------------------------------------------------- random streams


def capture_rng(dist_info: DistInfo, generators: dict[str, torch.Generator] | None = None) -> list[dict]:
    """Every rank's random streams, rank by rank: the global CPU one ("torch"), this rank's CUDA one,
    and the named ``generators``. A collective under torchrun (call on every rank)."""
    mine = {"torch": torch.get_rng_state()}
    for name, g in (generators or {}).items():
        mine[name] = g.get_state().cpu()
    if dist_info.device.type == "cuda":
        mine["cuda"] = torch.cuda.get_rng_state(dist_info.device)
    if not dist_info.distributed:
        return [mine]
    everyone: list = [None] * dist_info.world_size
    dist.all_gather_object(everyone, mine)
    return everyone


def restore_rng(
    states: list[dict], dist_info: DistInfo, path: str, generators: dict[str, torch.Generator] | None = None
) -> None:
    """Set this rank's streams to what ``capture_rng`` stored in ``path``; refuses another world size."""
    if len(states) != dist_info.world_size:
        raise CheckpointError(
            f"{path} was written by {len(states)} processes, this run has {dist_info.world_size}: the data order "
            "and random streams would not continue; resume with the same number of processes"
        )
    mine = states[dist_info.rank]
    torch.set_rng_state(mine["torch"])
    for name, g in (generators or {}).items():
        g.set_state(mine[name])
    if "cuda" in mine and dist_info.device.type == "cuda":
        torch.cuda.set_rng_state(mine["cuda"], dist_info.device)


# ----------------------------------------------------------------------------- resuming


def check_resumable(stored: dict[str, Any], config: Any, path: str) -> None:
    """Refuse to resume the run of ``path`` (stored settings ``stored``) with ``config`` when a setting
    other than ``type(config).CHANGEABLE_ON_RESUME`` differs. A setting the file does not have (added
    since it was written) counts as its default."""
    changeable = type(config).CHANGEABLE_ON_RESUME
    diffs = resume_differences(with_defaults(stored, type(config)), dataclasses.asdict(config), changeable)
    if diffs:
        raise CheckpointError(
            f"{path} belongs to a run with other settings; use another run folder or restore them "
            f"(only {', '.join(changeable)} may change):\n  - "
            + "\n  - ".join(f"{p}: checkpoint {old!r}, now {new!r}" for p, old, new in diffs)
        )
