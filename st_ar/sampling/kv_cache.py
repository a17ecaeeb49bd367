"""Key/value cache for autoregressive decoding, kept outside the model.

One preallocated (B, H_kv, max_len, head_dim) buffer per layer for keys and one for values.
``update`` writes a chunk at its position. Two ways to hand the cache back to attention:

- ``start_pos`` a Python int (eager decoding): the filled prefix ``[:, :, :start_pos + S]``, so a
  step attends over exactly the tokens so far, with no padding and no mask. Its length grows
  every step, which is why a compiled step would be re-specialised at every position.
- ``start_pos`` a 0-d integer tensor on the cache's device (static decoding): the chunk is
  written with ``index_copy_`` at the positions the tensor holds and the whole fixed-length
  buffer comes back. The model then masks the keys after the query's position. Every step has
  the same shapes and the position is data, so one compiled graph (and one CUDA graph) serves
  every position.
"""

from __future__ import annotations

import torch
from torch import Tensor


class LayerKVCache:
    def __init__(self, k: Tensor, v: Tensor):
        self.k, self.v = k, v  # (B, H_kv, max_len, head_dim)

    def update(self, start_pos: int | Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        if isinstance(start_pos, Tensor):
            # positions as data: no bounds check here (it would read the tensor on the host and
            # break the graph); generate() keeps positions inside max_len
            positions = start_pos + torch.arange(k.shape[2], device=k.device)  # (S,)
            self.k.index_copy_(2, positions, k)
            self.v.index_copy_(2, positions, v)
            return self.k, self.v
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
        p = model.tok_embeddings.weight  # the model's dtype and device (the head may be packed)
        max_len = max_len or c.cls_token_num + c.block_size
        return cls(c.n_layer, batch_size, c.kv_heads, max_len, c.head_dim, dtype=p.dtype, device=p.device)

    @property
    def batch_size(self) -> int:
        return self.layers[0].k.shape[0]

    @property
    def max_len(self) -> int:
        return self.layers[0].k.shape[2]

    def matches(self, batch_size: int, max_len: int, dtype: torch.dtype, device: torch.device) -> bool:
        k = self.layers[0].k
        return k.shape[0] == batch_size and k.shape[2] == max_len and k.dtype == dtype and k.device == device

    def zero_(self) -> KVCache:
        """Clear every buffer in place (the tensors, and so their addresses, stay the same)."""
        for layer in self.layers:
            layer.k.zero_()
            layer.v.zero_()
        return self

    def mark_static(self) -> KVCache:
        """Tell torch.compile the buffers live at fixed addresses (like module buffers), so CUDA
        graphs may write into them in place instead of refusing a graph with mutated inputs.

        Unguarded: another cache of the same shapes reuses the compiled graph (a CUDA graph is
        then re-recorded for the new addresses, not recompiled)."""
        mark = getattr(getattr(torch, "_dynamo", None), "mark_static_address", None)
        if mark is not None:
            for layer in self.layers:
                mark(layer.k, guard=False)
                mark(layer.v, guard=False)
        return self

    def keep_rows(self, rows: slice | Tensor) -> None:
        """Drop batch rows, e.g. the unconditional half once guidance stops."""
        for layer in self.layers:
            layer.keep_rows(rows)
