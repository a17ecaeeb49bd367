"""One ST-AR training objective on a batch: AR + alpha * MIM + beta * (step + view) / 2.

``STARObjective`` (configured by settings.py's ``ObjectiveConfig``) runs the student (masked
when MIM is on), the EMA teacher when any self-supervised loss is on, and returns the total loss
with a dict of named scalars. The LlamaGen baseline (one view, every extra loss off) runs the
student alone: no teacher forward, no mask, no projector.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..models.gpt import drop_labels
from ..models.heads import Projector
from .ar import ar_loss
from .contrastive import sample_steps, step_infonce, view_infonce
from .masks import key_masked_causal_mask, sample_hidden_keys
from .mim import mim_loss
from .settings import ObjectiveConfig

# gather(t) -> (targets of all ranks stacked on dim 0, row offset of this rank)
Gather = Callable[[Tensor], tuple[Tensor, int]]


def no_gather(t: Tensor) -> tuple[Tensor, int]:
    return t, 0


class STARObjective(nn.Module):
    """Holds the student-only projector; computes every loss of one training step."""

    def __init__(self, config: ObjectiveConfig, dim: int, n_layer: int):
        super().__init__()
        self.config = config
        self.n_layer = n_layer
        self.layer = config.layer(n_layer)
        self.projector = (
            Projector(dim, config.projector_hidden, dim, config.projector_layers) if config.contrastive else None
        )

    def forward(
        self,
        student: nn.Module,
        teacher: nn.Module | None,
        tokens: Tensor,  # (B, M, T) image tokens, M views per image
        labels: Tensor,  # (B,)
        *,
        null_class: int,
        generator: torch.Generator | None = None,
        shared_generator: torch.Generator | None = None,
        gather: Gather = no_gather,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """``generator`` draws this rank's label dropout and masks; ``shared_generator`` (seeded
        alike on every rank) draws the K contrasted positions, which must be the same on all ranks
        for the gathered targets to be the steps the losses describe."""
        cfg = self.config
        B, M, T = tokens.shape
        if M != cfg.num_views:
            raise ValueError(f"batch has {M} views per image, objective.num_views is {cfg.num_views}")
        if cfg.needs_teacher and teacher is None:
            raise ValueError("the self-supervised losses need the EMA teacher")
        labels = drop_labels(labels, cfg.label_dropout, null_class, generator)  # once per image
        labels = labels.repeat_interleave(M)  # (B*M,), view-major within an image
        seqs = tokens.flatten(0, 1)  # (N = B*M, T)
        inputs = seqs[:, :-1]  # [class, x_0 .. x_{T-2}] once the class token is prepended

        want = set()
        if cfg.mim:
            want.add(self.n_layer)
        if cfg.contrastive:
            want.add(self.layer)
        attn_mask = None
        if cfg.mim:
            hidden = sample_hidden_keys(seqs.shape[0], T, cfg.mask_ratio, generator=generator, device=seqs.device)
            attn_mask = key_masked_causal_mask(hidden)  # (N, 1, T, T)
        out = student(inputs, labels, attn_mask=attn_mask, return_hidden=tuple(want))
        losses = {"ar": ar_loss(out.logits, seqs)}
        total = losses["ar"]
        if not cfg.needs_teacher:
            return total, losses

        with torch.no_grad():
            t_out = teacher(inputs, labels, return_hidden=tuple(want), logits=False)
        if cfg.mim:
            losses["mim"] = mim_loss(out.hidden[self.n_layer], t_out.hidden[self.n_layer])
            total = total + cfg.mim_weight * losses["mim"]
        if cfg.contrastive:
            pos = sample_steps(T, cfg.num_steps, generator=shared_generator or generator).to(seqs.device)  # (K,)
            z = self.projector(out.hidden[self.layer][:, pos])  # (N, K, D)
            z = F.normalize(z.float(), dim=-1).view(B, M, len(pos), -1)
            t = F.normalize(t_out.hidden[self.layer][:, pos].float(), dim=-1).view(B, M, len(pos), -1)
            t_all, offset = gather(t)
            terms = []
            if cfg.step:
                losses["step"] = step_infonce(z, t_all, cfg.temperature, offset)
                terms.append(losses["step"])
            if cfg.view:
                losses["view"] = view_infonce(z, t_all, cfg.temperature, offset)
                terms.append(losses["view"])
            # beta * (L_step + L_view) / 2 as written in the paper; a switched-off term counts as 0
            total = total + cfg.contrastive_weight * sum(terms) / 2
        return total, losses
