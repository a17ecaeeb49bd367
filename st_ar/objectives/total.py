"""One ST-AR training objective on a batch: AR + alpha * MIM + beta * (step + view) / 2.

``STARObjective`` (configured by settings.py's ``ObjectiveConfig``) runs the student (masked
when MIM is on), the EMA teacher when any self-supervised loss is on, and returns the total loss
with a dict of named scalars. The LlamaGen baseline (one view, every extra loss off) runs the
student alone: no teacher forward, no mask, no projector.

The variants the paper leaves open (docs/training.md), each off by default: the student on the first
``student_views`` views only, the key mask on a ``masked_share`` of the sequences (L_AR on all of
them or on the unmasked ones, ``ar_loss_on``), and ``ssl=False`` past ``ssl_until``. The teacher
forwards what the losses compare, which train/flops.py counts.
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
        # the losses as pure functions of tensors, so compile_losses can swap in compiled ones
        self._ar, self._mim, self._step, self._view = ar_loss, mim_loss, step_infonce, view_infonce
        self._project = self._project_eager

    def compile_losses(self) -> None:
        """torch.compile each loss (and the projector with its normalisation) as a whole graph: shapes are
        fixed by the settings, so each compiles once (train.compile). The random draws (label dropout,
        masks, contrasted positions) stay eager: they use the run's generators."""
        self._ar, self._mim = torch.compile(ar_loss, dynamic=False), torch.compile(mim_loss, dynamic=False)
        self._step = torch.compile(step_infonce, dynamic=False)
        self._view = torch.compile(view_infonce, dynamic=False)
        self._project = torch.compile(self._project_eager, dynamic=False)

    def _project_eager(self, student_hidden: Tensor, teacher_hidden: Tensor, pos: Tensor) -> tuple[Tensor, Tensor]:
        """Projected student and plain teacher features at steps ``pos``, unit-normalised, fp32."""
        z = F.normalize(self.projector(student_hidden[:, pos]).float(), dim=-1)
        return z, F.normalize(teacher_hidden[:, pos].float(), dim=-1)

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
        ssl: bool = True,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """``generator`` draws this rank's label dropout and masks; ``shared_generator`` (seeded
        alike on every rank) draws the K contrasted positions, which must be the same on all ranks
        for the gathered targets to be the steps the losses describe. ``ssl=False`` (past
        objective.ssl_until) runs the plain next-token step on the student's sequences: no mask, no
        teacher, no projector."""
        cfg = self.config
        B, M, T = tokens.shape
        if M != cfg.num_views:
            raise ValueError(f"batch has {M} views per image, objective.num_views is {cfg.num_views}")
        ssl = ssl and cfg.needs_teacher
        if ssl and teacher is None:
            raise ValueError("the self-supervised losses need the EMA teacher")
        image_labels = drop_labels(labels, cfg.label_dropout, null_class, generator)  # once per image
        Ms = cfg.views_of_student  # the student trains on the first Ms views of each image
        labels = image_labels.repeat_interleave(Ms)  # (B*Ms,), view-major within an image
        seqs = tokens[:, :Ms].flatten(0, 1)  # (N = B*Ms, T)
        inputs = seqs[:, :-1]  # [class, x_0 .. x_{T-2}] once the class token is prepended
        N = seqs.shape[0]

        want = set()
        if ssl and cfg.mim:
            want.add(self.n_layer)
        if ssl and cfg.contrastive:
            want.add(self.layer)
        attn_mask, masked = None, None  # masked: rows of the masked sequences, None = all of them
        if ssl and cfg.mim:
            hidden, masked = self._hidden_keys(N, T, generator, seqs.device)
            attn_mask = key_masked_causal_mask(hidden)  # (N, 1, T, T)
        out = student(inputs, labels, attn_mask=attn_mask, return_hidden=tuple(want))
        if ssl and cfg.ar_loss_on == "unmasked":
            unmasked = torch.ones(N, dtype=torch.bool, device=seqs.device).index_fill_(0, masked, False)
            losses = {"ar": self._ar(out.logits[unmasked], seqs[unmasked])}
        else:
            losses = {"ar": self._ar(out.logits, seqs)}
        total = losses["ar"]
        if not ssl:
            return total, losses

        # the teacher runs what the losses compare: every view (L_view), the student's views (L_step),
        # or only the masked sequences (L_MIM alone)
        every_view = cfg.view and Ms < M
        masked_only = not cfg.contrastive and masked is not None
        if every_view:
            t_seqs, t_labels = tokens.flatten(0, 1), image_labels.repeat_interleave(M)
        elif masked_only:
            t_seqs, t_labels = seqs[masked], labels[masked]
        else:
            t_seqs, t_labels = seqs, labels
        with torch.no_grad():
            t_out = teacher(t_seqs[:, :-1], t_labels, return_hidden=tuple(want), logits=False)
        if cfg.mim:
            s_last, t_last = out.hidden[self.n_layer], t_out.hidden[self.n_layer]
            if every_view:  # the student's sequences are the first Ms views of each image
                t_last = t_last.view(B, M, *t_last.shape[1:])[:, :Ms].flatten(0, 1)
            if masked is not None:
                s_last = s_last[masked]
                t_last = t_last if masked_only else t_last[masked]
            losses["mim"] = self._mim(s_last, t_last)
            total = total + cfg.mim_weight * losses["mim"]
        if cfg.contrastive:
            pos = sample_steps(T, cfg.num_steps, generator=shared_generator or generator).to(seqs.device)  # (K,)
            z, t = self._project(out.hidden[self.layer], t_out.hidden[self.layer], pos)  # (N, K, D) each
            z, t = z.view(B, Ms, len(pos), -1), t.view(B, -1, len(pos), z.shape[-1])
            t_all, offset = gather(t)  # (B or more, M or Ms, K, D)
            terms = []
            if cfg.step:
                losses["step"] = self._step(z, t_all[:, :Ms], cfg.temperature, offset)
                terms.append(losses["step"])
            if cfg.view:
                losses["view"] = self._view(z, t_all, cfg.temperature, offset)
                terms.append(losses["view"])
            # beta * (L_step + L_view) / 2 as written in the paper; a switched-off term counts as 0
            total = total + cfg.contrastive_weight * sum(terms) / 2
        return total, losses

    def _hidden_keys(self, n: int, T: int, generator: torch.Generator | None, device) -> tuple[Tensor, Tensor | None]:
        """(n, T) hidden-key flags and the rows that are masked (None: all). Every sequence is masked,
        or (objective.masked_share < 1) a random ``masked_sequences(n)`` of them, in row order; the
        others hide nothing."""
        cfg = self.config
        if cfg.masked_share >= 1.0:
            return sample_hidden_keys(n, T, cfg.mask_ratio, generator=generator, device=device), None
        k = cfg.masked_sequences(n)
        rows = torch.randperm(n, generator=generator, device=generator.device if generator else device)[:k]
        rows = rows.sort().values.to(device)
        hidden = torch.zeros(n, T, dtype=torch.bool, device=device)
        hidden[rows] = sample_hidden_keys(k, T, cfg.mask_ratio, generator=generator, device=device)
        return hidden, rows
