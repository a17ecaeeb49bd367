"""Next-token prediction, the LlamaGen objective."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def ar_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean cross-entropy of logits (N, T, V) against image tokens (N, T); position p predicts x_p."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
