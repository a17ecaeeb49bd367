"""Process-group set-up for torchrun (NCCL on GPUs, gloo on CPU) and single-process runs alike.

    dist_info = init_distributed()      # reads RANK / LOCAL_RANK / WORLD_SIZE set by torchrun
    ...
    cleanup_distributed()

A plain ``python script.py`` gets world size 1 and no process group, so every helper below
works without torchrun.
"""

from __future__ import annotations

import gc
import os
import signal
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str = "auto") -> torch.device:
    """The device a setting names: "auto" is this process's GPU when CUDA is available, else the CPU.

    Under torchrun "auto" and a bare "cuda" both mean the rank's own GPU (cuda:LOCAL_RANK), which
    would otherwise put every rank on GPU 0.
    """
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if name == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and "LOCAL_RANK" in os.environ:
        return torch.device(f"cuda:{local_rank}")
    return torch.device(name)


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the process group torchrun describes, or run alone; pick this rank's device.

    ``device`` "auto" means this rank's GPU when CUDA is available, else the CPU.
    """
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    dev = resolve_device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return DistInfo(rank, local_rank, world_size, dev)


def cleanup_distributed() -> None:
    if dist.is_initialized():
        # collect unreachable DDP wrappers while their group still exists: a DDP reducer that was
        # still alive when the gloo group was destroyed has aborted its rank at interpreter exit
        gc.collect()
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_mean(values: dict[str, float], device: torch.device | str = "cpu") -> dict[str, float]:
    """Average scalars over ranks (for logging); identity when running alone."""
    if not dist.is_initialized() or not values:
        return dict(values)
    t = torch.tensor(list(values.values()), dtype=torch.float64, device=device)
    dist.all_reduce(t)
    t /= dist.get_world_size()
    return dict(zip(values, t.tolist(), strict=True))


def print0(*args, **kwargs) -> None:
    """print on rank 0 only (never rebinds the builtin)."""
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, **kwargs)


def all_gather_rows(t: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Concatenate ``t`` (B, ...) from every rank along dim 0; also return this rank's row offset.

    For contrastive negatives: the result carries no gradient (teacher targets need none), and
    every rank must hold the same B (the training sampler drops the ragged tail).
    """
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return t, 0
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts), dist.get_rank() * t.shape[0]


def broadcast_from_main(obj, info: DistInfo):
    """Rank 0's ``obj`` (any picklable value) on every rank; ``obj`` itself when running alone."""
    if not info.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def any_rank(flag: bool, device: torch.device | str = "cpu") -> bool:
    """True on every rank when ``flag`` is True on at least one (so all ranks stop together)."""
    if not dist.is_initialized():
        return flag
    t = torch.tensor([int(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


class GracefulStop:
    """First Ctrl-C (or SIGTERM): ``requested`` turns True, so the loop can finish its step, save and
    exit. A second one raises KeyboardInterrupt at once. Handlers are restored on exit."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self) -> GracefulStop:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
