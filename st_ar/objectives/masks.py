"""Attention masks built by the objectives and consumed by the model (True = may attend)."""

from __future__ import annotations

import torch
from torch import Tensor


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
