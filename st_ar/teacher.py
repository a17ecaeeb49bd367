"""The EMA teacher: a frozen copy of the student that follows it by exponential moving average.

    teacher = build_teacher(student)          # deepcopy, no gradients, eval mode
    update_ema(teacher, student, decay)       # after every optimizer step
    decay = ema_schedule(kind, final, total_steps, start)(step)

Parameters are matched by name, never by position, so a module order change cannot silently pair
the wrong tensors. The tokenizer trainer keeps its EMA weights with the same two functions (the
"warmup" schedule, buffers copied). ``TeacherConfig`` is the ``teacher`` section of a run's
configuration; this module imports torch only when a teacher is updated, so ``st_ar.config`` stays
light.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn

EMA_SCHEDULES = ("constant", "cosine", "warmup")


@dataclass
class TeacherConfig:
    ema_decay: float = 0.9999  # paper; too slow for short runs (the teacher would barely move)
    ema_schedule: str = "constant"  # constant | cosine (from ema_start up to ema_decay) | warmup
    ema_start: float = 0.0  # first decay of the cosine schedule

    def __post_init__(self):
        check_ema_schedule(self.ema_schedule, "teacher.ema_schedule")


def check_ema_schedule(kind: str, name: str = "EMA schedule") -> None:
    if kind not in EMA_SCHEDULES:
        raise ValueError(f"{name} must be {', '.join(EMA_SCHEDULES[:-1])} or {EMA_SCHEDULES[-1]}, got {kind!r}")


def build_teacher(student: nn.Module) -> nn.Module:
    teacher = copy.deepcopy(student)
    teacher.requires_grad_(False)
    return teacher.eval()


def update_ema(teacher: nn.Module, student: nn.Module, decay: float, *, buffers: bool = False) -> None:
    """teacher <- decay * teacher + (1 - decay) * student, for every parameter, by name.

    ``buffers``: also copy the student's buffers (the tokenizer's codebook-usage record).
    """
    import torch

    with torch.no_grad():
        student_params = dict(student.named_parameters())
        for name, t in teacher.named_parameters():
            s = student_params.get(name)
            if s is None:
                raise KeyError(f"teacher parameter {name!r} has no student counterpart")
            t.lerp_(s.detach().to(t.dtype), 1.0 - decay)
        if buffers:
            student_buffers = dict(student.named_buffers())
            for name, b in teacher.named_buffers():
                b.copy_(student_buffers[name])


def ema_schedule(kind: str, final: float, total_steps: int, start: float = 0.0) -> Callable[[int], float]:
    """Teacher decay as a function of the optimizer step (0-based: the steps done before this one).

    - "constant": ``final`` from the first step (the paper's 0.9999 on ImageNet-length runs);
    - "cosine": from ``start`` up to ``final`` along a half cosine over ``total_steps`` (DINO);
    - "warmup": min(final, (1 + step) / (10 + step)), which lets a short run's teacher move
      early on and settles to ``final`` (the usual EMA warm-up; the tokenizer's EMA).
    A decay near 1 on a run of a few thousand steps leaves the teacher at its initial weights.
    """
    check_ema_schedule(kind)
    if not 0.0 <= final <= 1.0 or not 0.0 <= start <= 1.0:
        raise ValueError(f"EMA decays must lie in [0, 1], got start {start}, final {final}")
    if kind == "constant":
        return lambda step: final
    if kind == "cosine":
        span = max(total_steps, 1)
        return lambda step: final - (final - start) * (math.cos(math.pi * min(step, span) / span) + 1) / 2
    return lambda step: min(final, (1 + step) / (10 + step))
