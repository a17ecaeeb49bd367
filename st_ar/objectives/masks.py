"""Attention masks built by the objectives and consumed by the model (True = may attend).

The ST-AR key mask comes in two forms that allow the same attention: a dense (B, 1, S, S) bool
tensor for SDPA (``key_masked_causal_mask``) and a FlexAttention ``BlockMask`` whose mask_mod
reads only the (B, S) hidden-key flags (``key_masked_block_mask``, torch >= 2.5). The model takes
either; given the dense one with attention="flex" it builds a BlockMask from it itself.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..models.layers import create_block_mask, flex_available


def key_masked_causal_mask(hidden_keys: Tensor) -> Tensor:
    """Causal mask where the slots in ``hidden_keys`` (B, S) bool are hidden as keys.

    A hidden key stays visible to its own query (every query keeps itself, so no row is empty)
    and is hidden from every other query. Returns (B, 1, S, S), shared across heads and layers.
    """
    B, S = hidden_keys.shape
    causal = torch.ones(S, S, dtype=torch.bool, device=hidden_keys.device).tril()
    own = torch.eye(S, dtype=torch.bool, device=hidden_keys.device)
    allowed = causal & (~hidden_keys[:, None, :] | own)  # (B, S, S): query rows, key columns
    return allowed[:, None]


def key_masked_block_mask(hidden_keys: Tensor):
    """The ``key_masked_causal_mask`` of ``hidden_keys`` (B, S) bool as a FlexAttention BlockMask.

    Causal, and a hidden key is visible to its own query only. Blocks above the diagonal are
    skipped; the rest are partial (hidden keys are spread at random), where the mask_mod runs.
    """
    if not flex_available():
        raise RuntimeError(f"a BlockMask needs FlexAttention (torch >= 2.5); this is torch {torch.__version__}")
    B, S = hidden_keys.shape

    def allowed(b, h, q, kv):
        return (q >= kv) & (~hidden_keys[b, kv] | (q == kv))

    return create_block_mask(allowed, B, None, S, S, device=hidden_keys.device)


def sample_hidden_keys(
    batch: int,
    seq_len: int,
    ratio: float,
    *,
    num_prefix: int = 1,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> Tensor:
    """Pick, per sequence, round(ratio * seq_len) slots to hide among the image slots.

    The first ``num_prefix`` slots (the class token) are never hidden. Returns (B, S) bool with
    exactly that many True per row. ST-AR (paper): ratio 0.25 of the T input positions.
    """
    n_hide = round(ratio * seq_len)
    candidates = seq_len - num_prefix
    if not 0 <= n_hide <= candidates:
        raise ValueError(f"mask ratio {ratio} hides {n_hide} of {candidates} image slots; use a ratio in [0, 1)")
    # argsort of uniform noise = a uniformly random subset of each row, all rows at once
    noise = torch.rand(batch, candidates, generator=generator, device=generator.device if generator else device)
    chosen = noise.argsort(dim=1)[:, :n_hide] + num_prefix
    hidden = torch.zeros(batch, seq_len, dtype=torch.bool, device=chosen.device)
    return hidden.scatter_(1, chosen, True).to(device)
