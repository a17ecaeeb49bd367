"""The EMA teacher: a frozen copy of the student that follows it by exponential moving average.

    teacher = build_teacher(student)          # deepcopy, no gradients, eval mode
    update_ema(teacher, student, decay)       # after every optimizer step
    decay = ema_schedule(cfg, total_steps)(step)

Parameters are matched by name, never by position, so a module order change cannot silently pair
the wrong tensors.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import torch
from torch import nn


def build_teacher(student: nn.Module) -> nn.Module:
    teacher = copy.deepcopy(student)
    teacher.requires_grad_(False)
    return teacher.eval()


@torch.no_grad()
def update_ema(teacher: nn.Module, student: nn.Module, decay: float) -> None:
    """teacher <- decay * teacher + (1 - decay) * student, for every parameter, by name."""
    student_params = dict(student.named_parameters())
    for name, t in teacher.named_parameters():
        s = student_params.get(name)
        if s is None:
            raise KeyError(f"teacher parameter {name!r} has no student counterpart")
        t.lerp_(s.detach().to(t.dtype), 1.0 - decay)


def ema_schedule(kind: str, final: float, total_steps: int, start: float = 0.0) -> Callable[[int], float]:
    """Teacher decay as a function of the optimizer step.

    - "constant": ``final`` from the first step (the paper's 0.9999 on ImageNet-length runs);
    - "cosine": from ``start`` up to ``final`` along a half cosine over ``total_steps`` (DINO);
    - "warmup": min(final, (1 + step) / (10 + step)), which lets a short run's teacher move
      early on and settles to ``final`` (the usual EMA warm-up).
    A decay near 1 on a run of a few thousand steps leaves the teacher at its initial weights.
    """
    if not 0.0 <= final <= 1.0 or not 0.0 <= start <= 1.0:
        raise ValueError(f"EMA decays must lie in [0, 1], got start {start}, final {final}")
    if kind == "constant":
        return lambda step: final
    if kind == "cosine":
        span = max(total_steps, 1)
        return lambda step: final - (final - start) * (math.cos(math.pi * min(step, span) / span) + 1) / 2
    if kind == "warmup":
        return lambda step: min(final, (1 + step) / (10 + step))
    raise ValueError(f"unknown EMA schedule {kind!r}; use constant, cosine or warmup")
