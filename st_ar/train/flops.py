"""Analytic training compute: the model FLOPs of one training step, from the settings alone.

    flops = step_flops(gpt_config, cfg.objective, images)              # a forward/backward on `images` images
    flops = run_step_flops(cfg, gpt_config, world_size)                # one optimizer step of a run, all ranks
    flops = run_step_flops(cfg, gpt_config, world_size, ssl=False)     # a step past objective.ssl_until

Per sequence of S = block_size positions (class token + T - 1 image tokens), a forward is
2 x matmul weights x S plus 4 x n_layer x S^2 x dim for the attention scores and their product with
the values (the whole S x S square: neither the causal nor the key mask is discounted, as in PaLM's
MFU; so the mask and objective.masked_share cost nothing here). A backward is twice its forward.

  student   3 x (2 x (block + head weights) x S + attention) per sequence it trains on
            (objective.student_views per image, all views by default)
  teacher   2 x block weights x S + attention per sequence it runs (no output head), no backward,
            through the blocks up to the deepest one a loss reads (all with L_MIM, else the contrasted
            one): every view when L_view is on; the student's sequences when only L_step is; the
            masked ones when L_MIM is the only loss (objective.masked_share < 1 masks fewer)
  projector 6 x its matmul weights per contrasted position, K per student sequence

Embedding lookups, norms, softmax, the losses, the EMA update and AdamW are left out. The count is
the same for every precision and needs only the settings. tests/test_gpu_check.py checks it against
torch's FlopCounterMode for each objective variant.
"""

from __future__ import annotations

from ..models.gpt import GPTConfig
from ..objectives.settings import ObjectiveConfig


def matmul_params(config: GPTConfig) -> tuple[int, int]:
    """(weights of the transformer blocks' matmuls, weights of the output head): the >= 2-D weights
    that multiply activations (embedding tables are lookups)."""
    c = config
    qkv = c.dim * (c.n_head + 2 * c.kv_heads) * c.head_dim
    wo = c.n_head * c.head_dim * c.dim
    ffn = 3 * c.dim * c.ffn_hidden
    return c.n_layer * (qkv + wo + ffn), c.dim * c.vocab_size


def projector_matmul_params(objective: ObjectiveConfig, dim: int) -> int:
    """Weights of the projector's linear layers (heads.Projector: dim -> hidden ... -> dim); biases
    and LayerNorms are not matmuls. 0 without a contrastive loss (no projector is built)."""
    if not objective.contrastive:
        return 0
    widths = [dim] + [objective.projector_hidden] * (objective.projector_layers - 1) + [dim]
    return sum(a * b for a, b in zip(widths[:-1], widths[1:]))


def step_flops(config: GPTConfig, objective: ObjectiveConfig, images: int, *, ssl: bool = True) -> float:
    """Model FLOPs of one forward/backward of ``objective`` on ``images`` images of
    ``objective.num_views`` views, as one micro-batch (see the module docstring). ``ssl=False``: the
    plain next-token step past ``objective.ssl_until`` (student only, on the same sequences)."""
    c = config
    S = c.block_size
    blocks, head = matmul_params(c)
    attention = 4 * c.n_layer * S * S * c.dim  # per sequence, forward
    student_seqs = images * objective.views_of_student
    flops = 3 * (2 * (blocks + head) * S + attention) * student_seqs
    if not (ssl and objective.needs_teacher):
        return float(flops)
    # the teacher runs up to the deepest block a loss reads: the last for L_MIM, else the contrasted one
    depth = c.n_layer if objective.mim else objective.layer(c.n_layer)
    flops += (2 * blocks * S + attention) * depth / c.n_layer * teacher_sequences(objective, images)
    if objective.contrastive:
        flops += 6 * projector_matmul_params(objective, c.dim) * objective.num_steps * student_seqs
    return float(flops)


def teacher_sequences(objective: ObjectiveConfig, images: int) -> int:
    """Sequences the teacher forwards for one micro-batch of ``images`` images (STARObjective)."""
    student_seqs = images * objective.views_of_student
    if objective.view:
        return images * objective.num_views
    if objective.step or not objective.mim:
        return student_seqs
    return objective.masked_sequences(student_seqs)  # L_MIM alone: the masked sequences


def run_step_flops(cfg, config: GPTConfig, world_size: int = 1, *, ssl: bool = True) -> float:
    """Model FLOPs of one optimizer step of run ``cfg`` (a RunConfig) over all ``world_size`` ranks:
    optim.batch_size images in world_size x optim.grad_accum micro-batches."""
    micro_batches = world_size * cfg.optim.grad_accum
    images = cfg.optim.batch_size // micro_batches
    return micro_batches * step_flops(config, cfg.objective, images, ssl=ssl)
