"""Parallelism applied after the model is built: the model code stays single-device.

DDP (GPT-B, L, XL) wraps the student bundle; FSDP (XXL, 3B) shards the student and the teacher
the same way, block by block, so the EMA update pairs local shards of the same parameters.
"""

from __future__ import annotations

from torch import nn

try:  # public from torch 2.6; the same function lived here in 2.4 and 2.5
    from torch.distributed.fsdp import fully_shard
except ImportError:  # pragma: no cover - older torch
    from torch.distributed._composable.fsdp import fully_shard


def shard_model(root: nn.Module, gpt: nn.Module) -> None:
    """FSDP2: one unit per transformer block (gathered just in time), one for the rest of ``root``."""
    for block in gpt.layers:
        fully_shard(block)
    fully_shard(root)


def full_tensor(t):
    """A DTensor's full value (sharded gradients norms, parameters); plain tensors unchanged."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t
