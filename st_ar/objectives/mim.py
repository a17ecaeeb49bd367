"""L_MIM: the masked student's last-block features should match the unmasked EMA teacher's."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def mim_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """Mean over all positions of 1 - cos(h, h_hat); student/teacher (N, S, D), teacher detached."""
    return (1 - F.cosine_similarity(student.float(), teacher.detach().float(), dim=-1)).mean()
