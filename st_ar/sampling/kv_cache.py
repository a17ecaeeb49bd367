"""Key/value cache for autoregressive decoding, kept outside the model.

One preallocated (B, H_kv, max_len, head_dim) buffer per layer for keys and one for values.
``update`` writes a chunk at its position and hands back the filled prefix, so a decode step
attends over exactly the tokens so far: no padding, no mask.
"""

from __future__ import annotations

import torch
from torch import Tensor


class LayerKVCache:
    def __init__(self, k: Tensor, v: Tensor):
        self.k, self.v = k, v  # (B, H_kv, max_len, head_dim)

    def update(self, start_pos: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        end = start_pos + k.shape[2]
        if end > self.k.shape[2]:
            raise ValueError(f"KV cache holds {self.k.shape[2]} positions, asked to write up to {end}")
        self.k[:, :, start_pos:end] = k
        self.v[:, :, start_pos:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]

    def keep_rows(self, rows: slice | Tensor) -> None:
        self.k, self.v = self.k[rows], self.v[rows]


class KVCache:
    def __init__(
        self,
        n_layer: int,
        batch_size: int,
        n_kv_head: int,
        max_len: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ):
        shape = (batch_size, n_kv_head, max_len, head_dim)
        self.layers = [
            LayerKVCache(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
            for _ in range(n_layer)
        ]

    @classmethod
    def for_model(cls, model, batch_size: int, max_len: int | None = None) -> KVCache:
        """A cache sized for ``model``: by default the class token plus a full image."""
        c = model.config
        p = model.output.weight
        max_len = max_len or c.cls_token_num + c.block_size
        return cls(c.n_layer, batch_size, c.kv_heads, max_len, c.head_dim, dtype=p.dtype, device=p.device)

    @property
    def batch_size(self) -> int:
        return self.layers[0].k.shape[0]

    def keep_rows(self, rows: slice | Tensor) -> None:
        """Drop batch rows, e.g. the unconditional half once guidance stops."""
        for layer in self.layers:
            layer.keep_rows(rows)
