"""L_step and L_view: InfoNCE between student features and EMA-teacher targets.

Shapes: anchors z (B, M, K, D) are projected student features, targets t (N, M, K, D) are teacher
features of the same K positions, both L2-normalised. N >= B: under data parallelism t holds
the targets of every rank (extra negatives), and this rank's images sit at rows
``offset .. offset + B``. Every loss is a cross-entropy over the N images: the positive is the
anchor's own image, the negatives are all others.

  L_step: anchor z[b, m, i], positive t[b, m, j] (same image and view, other step j != i)
  L_view: anchor z[b, m, k], positive t[b, m', k] (same image and step, other view m' != m)

Both are averaged over b and over the ordered pairs (i, j) or (m, m'). With
objective.student_views = 1 the anchors hold view 0 only: L_step runs within it, L_view between
it and the teacher's other views.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def sample_steps(num_positions: int, k: int, *, first: int = 1, generator: torch.Generator | None = None) -> Tensor:
    """K distinct positions in [first, num_positions), uniformly, shared across the batch.

    Position 0 (the class slot) is excluded by default: its feature depends on the label alone,
    so it is the same for every image of a class and carries nothing to contrast.
    """
    if k > num_positions - first:
        raise ValueError(f"cannot pick {k} distinct steps among {num_positions - first} positions")
    device = generator.device if generator is not None else "cpu"
    return torch.randperm(num_positions - first, generator=generator, device=device)[:k] + first


def _own_rows(B: int, offset: int, device) -> Tensor:
    return torch.arange(offset, offset + B, device=device)


def _off_diagonal(rows: int, cols: int, device) -> tuple[Tensor, Tensor]:
    """Row and column indices of the (r, c) pairs with r != c of a rows x cols grid (rows <= cols), in
    row-major order: what a boolean ~eye mask selects, from arithmetic alone (no data-dependent
    nonzero, so the losses compile as one graph)."""
    pair = torch.arange(rows * (cols - 1), device=device)
    r, c = pair // (cols - 1), pair % (cols - 1)
    return r, c + (c >= r).long()


def step_infonce(z: Tensor, t: Tensor, temperature: float, offset: int = 0) -> Tensor:
    B, M, K, _ = z.shape
    if K < 2:
        raise ValueError("L_step needs at least 2 sampled steps (K >= 2)")
    # logits[m, i, j, b, n] = <z[b, m, i], t[n, m, j]> / tau
    logits = torch.einsum("bmid,nmjd->mijbn", z.float(), t.float()) / temperature
    i, j = _off_diagonal(K, K, z.device)
    logits = logits[:, i, j]  # (M, K(K-1), B, N)
    target = _own_rows(B, offset, z.device).expand(*logits.shape[:-1])
    return F.cross_entropy(logits.flatten(0, 2), target.flatten())


def view_infonce(z: Tensor, t: Tensor, temperature: float, offset: int = 0) -> Tensor:
    """z may hold fewer views than t (objective.student_views): z's view m is t's view m, and its
    positives are t's other views."""
    B, Ms, K, _ = z.shape
    M = t.shape[1]
    if M < 2 or Ms > M:
        raise ValueError(f"L_view needs at least 2 views per image (M >= 2) and no more anchors' views, got {Ms}/{M}")
    # logits[m, p, k, b, n] = <z[b, m, k], t[n, p, k]> / tau
    logits = torch.einsum("bmkd,npkd->mpkbn", z.float(), t.float()) / temperature
    m, p = _off_diagonal(Ms, M, z.device)
    logits = logits[m, p]  # (Ms(M-1), K, B, N)
    target = _own_rows(B, offset, z.device).expand(*logits.shape[:-1])
    return F.cross_entropy(logits.flatten(0, 2), target.flatten())
