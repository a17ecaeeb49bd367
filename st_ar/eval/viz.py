"""Analysis of what next-token prediction attends to and how stable its tokens are (paper, figure 1).

Attention. The model reads the training sequence [class, x_0, ..., x_{T-2}]: the query at sequence
position q predicts grid cell q (raster order) and may attend to key 0 (the class token) and keys
1..q, which hold cells 0..q-1. So a step t shows the query at position t, the cell it is about to
generate is marked, and its attention over already generated cells is drawn on the token grid.

Locality. The neighbour mass of a query is its attention on the keys holding the 8 spatial
neighbours of the cell it predicts that precede that cell in raster order (up-left, up, up-right,
left: at most 4). It is compared with what uniform attention over the visible keys would give.

Views. Two crops of one image shifted by a few pixels get different token indices at the same grid
position (the VQ tokenizer is not shift invariant); ``token_agreement`` measures this, optionally
searching small integer grid shifts so that a crop offset by whole tokens is not counted as a change.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from ..models.gpt import GPT

# ---------------------------------------------------------------------------------------------------
# Attention maps and locality
# ---------------------------------------------------------------------------------------------------


@torch.no_grad()
def attention_maps(model: GPT, tokens: Tensor, cond: Tensor, block: int) -> Tensor:
    """(B, H, T, T) attention probabilities of ``block`` (1-based) on [class, x_0 .. x_{T-2}].

    ``tokens``: (B, T) image tokens (the last one is not fed: no query predicts past the grid).
    """
    was_training = model.training
    model.eval()
    try:
        out = model(tokens[:, :-1], cond, return_attention=(block,), logits=False)
    finally:
        model.train(was_training)
    return out.attention[block].float()


def causal_neighbours(cell: int, grid: tuple[int, int]) -> list[int]:
    """Cells among the 8 spatial neighbours of ``cell`` that precede it in raster order."""
    h, w = grid
    r, c = divmod(cell, w)
    found = []
    for dr in (-1, 0, 1):
        for dc in (-1, 0, 1):
            rr, cc = r + dr, c + dc
            if (dr, dc) != (0, 0) and 0 <= rr < h and 0 <= cc < w and rr * w + cc < cell:
                found.append(rr * w + cc)
    return sorted(found)


def neighbour_mask(grid: tuple[int, int]) -> Tensor:
    """(T, T) bool over (query position, key position): key holds a causal neighbour of the query's cell.

    Query q predicts cell q; key k >= 1 holds cell k - 1.
    """
    T = grid[0] * grid[1]
    mask = torch.zeros(T, T, dtype=torch.bool)
    for q in range(T):
        for cell in causal_neighbours(q, grid):
            mask[q, cell + 1] = True
    return mask


def locality_summary(attn: Tensor, grid: tuple[int, int]) -> dict:
    """Mean attention mass on the causal spatial neighbours and on the class token.

    ``attn``: (B, H, S, S) probabilities on [class, x_0 .. x_{S-2}], S <= T. Averaged over queries
    1..S-1 (query 0 sees only the class token), images and heads; also per head, and the neighbour
    mass uniform attention over the visible keys would give (the chance level).
    """
    B, H, S, _ = attn.shape
    mask = neighbour_mask(grid)[:S, :S].to(attn.device)  # (S, S)
    neighbour = (attn * mask).sum(-1)[:, :, 1:]  # (B, H, S - 1)
    cls = attn[:, :, 1:, 0]  # (B, H, S - 1)
    visible = torch.arange(2, S + 1, device=attn.device, dtype=attn.dtype)  # query q sees q + 1 keys
    uniform = (mask[1:].sum(-1).to(attn.dtype) / visible).mean()
    return {
        "neighbour_mass": float(neighbour.mean()),
        "class_mass": float(cls.mean()),
        "uniform_neighbour_mass": float(uniform),
        "neighbour_mass_per_head": [float(x) for x in neighbour.mean((0, 2))],
        "class_mass_per_head": [float(x) for x in cls.mean((0, 2))],
        "num_images": B,
        "num_queries": S - 1,
    }


def mean_locality(
    model: GPT,
    codes: Tensor,
    labels: Tensor,
    block: int,
    grid: tuple[int, int],
    *,
    null_class: bool = False,
    batch_size: int = 16,
    device: str | torch.device = "cpu",
) -> tuple[dict, int]:
    """``locality_summary`` of block ``block`` over all of (N, T) ``codes``, in batches, each batch weighted by
    its images; the class token is each image's label, or the null class. Returns (summary, images)."""
    sums, count = None, 0
    for i in range(0, len(codes), batch_size):
        x, y = codes[i : i + batch_size].to(device), labels[i : i + batch_size].to(device)
        cond = torch.full_like(y, model.config.null_class) if null_class else y
        s = locality_summary(attention_maps(model, x, cond, block), grid)
        b = x.shape[0]
        if sums is None:
            sums = {k: np.asarray(v, dtype=np.float64) * b for k, v in s.items() if k not in ("num_images",)}
        else:
            for k in sums:
                sums[k] += np.asarray(s[k], dtype=np.float64) * b
        count += b
    return {k: (v / count).tolist() for k, v in sums.items() if k != "num_queries"}, count


def query_heatmap(row: Tensor, q: int, grid: tuple[int, int]) -> tuple[np.ndarray, float]:
    """One query's attention (``row``: (keys,)) as an (h, w) map over image cells, and the class weight.

    Cells at or after the predicted cell q were not generated yet and stay 0.
    """
    h, w = grid
    heat = np.zeros(h * w, dtype=np.float32)
    heat[:q] = row[1 : q + 1].float().cpu().numpy()
    return heat.reshape(h, w), float(row[0])


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    return plt


def render_attention(
    attn: Tensor,
    steps: Sequence[int],
    grid: tuple[int, int],
    path: str | os.PathLike,
    *,
    image: np.ndarray | None = None,
    per_head: bool = False,
    title: str = "",
) -> None:
    """PNG: one row per step; columns: head-averaged heatmap, overlay on ``image`` (H, W, 3 uint8), heads.

    ``attn``: (H, S, S) attention of one image.
    """
    plt = _plt()
    H = attn.shape[0]
    mean = attn.mean(0)  # (S, S)
    cols = 1 + (image is not None) + (H if per_head else 0)
    fig, axes = plt.subplots(len(steps), cols, figsize=(2.3 * cols, 2.3 * len(steps)), squeeze=False)

    def mark(ax, q, scale=1.0):
        r, c = divmod(q, grid[1])  # the cell query q predicts
        ax.add_patch(
            plt.Rectangle(((c - 0.5) * scale, (r - 0.5) * scale), scale, scale, fill=False, color="red", lw=1.5)
        )

    for i, q in enumerate(steps):
        heat, cls = query_heatmap(mean[q], q, grid)
        ax = axes[i, 0]
        ax.imshow(heat, cmap="viridis")
        mark(ax, q)
        ax.set_title(f"step {q}: class {cls:.2f}", fontsize=8)
        col = 1
        if image is not None:
            size = image.shape[0] / grid[0]
            # upsample the heatmap to the image by repeating each cell (nearest neighbour)
            up = np.kron(heat / max(heat.max(), 1e-12), np.ones((int(size), int(size))))
            ax = axes[i, col]
            ax.imshow(image)
            ax.imshow(up, cmap="jet", alpha=0.5, extent=(-0.5, image.shape[1] - 0.5, image.shape[0] - 0.5, -0.5))
            r, c = divmod(q, grid[1])
            ax.add_patch(plt.Rectangle((c * size - 0.5, r * size - 0.5), size, size, fill=False, color="red", lw=1.5))
            col += 1
        if per_head:
            for hd in range(H):
                heat_h, cls_h = query_heatmap(attn[hd, q], q, grid)
                ax = axes[i, col + hd]
                ax.imshow(heat_h, cmap="viridis")
                mark(ax, q)
                ax.set_title(f"head {hd}: class {cls_h:.2f}", fontsize=7)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------
# Two views of one image
# ---------------------------------------------------------------------------------------------------


def token_agreement(a: np.ndarray, b: np.ndarray, max_shift: int = 0) -> tuple[float, tuple[int, int]]:
    """Fraction of identical tokens of two (h, w) code grids, and the grid shift (dy, dx) giving it.

    With ``max_shift`` > 0, the best fraction over shifts |dy|, |dx| <= max_shift, comparing
    a[y, x] with b[y + dy, x + dx] on the overlap (so a crop offset by whole tokens still agrees).
    Ties go to the smaller shift.
    """
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"expected two code grids of one (h, w) shape, got {a.shape} and {b.shape}")
    h, w = a.shape
    if not 0 <= max_shift < min(h, w) // 2 + 1:
        raise ValueError(f"max_shift must lie in [0, {min(h, w) // 2}] for a {h}x{w} grid, got {max_shift}")
    shifts = [(dy, dx) for dy in range(-max_shift, max_shift + 1) for dx in range(-max_shift, max_shift + 1)]
    shifts.sort(key=lambda s: (abs(s[0]) + abs(s[1]), s))
    best, best_shift = -1.0, (0, 0)
    for dy, dx in shifts:
        pa = a[max(0, -dy) : h - max(0, dy), max(0, -dx) : w - max(0, dx)]
        pb = b[max(0, dy) : h - max(0, -dy), max(0, dx) : w - max(0, -dx)]
        frac = float((pa == pb).mean())
        if frac > best:
            best, best_shift = frac, (dy, dx)
    return best, best_shift


def mean_token_agreement(
    codes_a: Tensor | np.ndarray, codes_b: Tensor | np.ndarray, grid: tuple[int, int], max_shift: int, mirror: bool
) -> dict[str, float | None]:
    """``token_agreement`` of two views of each image, averaged: at the same grid position, at the best
    shift up to ``max_shift``, and (``mirror``: one view is flipped) against the second view mirrored."""
    same, shifted, mirrored = [], [], []
    for a, b in zip(codes_a, codes_b):
        a, b = np.asarray(a).reshape(grid), np.asarray(b).reshape(grid)
        same.append(token_agreement(a, b)[0])
        shifted.append(token_agreement(a, b, max_shift)[0])
        if mirror:
            mirrored.append(token_agreement(a, b[:, ::-1], max_shift)[0])
    return {
        "agreement_same_position": float(np.mean(same)),
        "agreement_best_shift": float(np.mean(shifted)),
        "agreement_mirrored_best_shift": float(np.mean(mirrored)) if mirrored else None,
    }


def feature_cosine(feats_a: dict[int, Tensor], feats_b: dict[int, Tensor]) -> dict[int, float]:
    """Mean cosine similarity per step of two {step: (N, dim)} feature sets (row i of a vs row i of b)."""
    return {s: float(torch.nn.functional.cosine_similarity(feats_a[s], feats_b[s], dim=-1).mean()) for s in feats_a}


def codes_to_colors(grid_codes: np.ndarray, vocab_size: int) -> np.ndarray:
    """(h, w) token indices -> (h, w, 3) uint8; a fixed random color per index, so equal tokens match."""
    palette = np.random.default_rng(0).integers(0, 256, size=(vocab_size, 3), dtype=np.uint8)
    return palette[np.asarray(grid_codes) % vocab_size]


def render_views(
    grid_a: np.ndarray,
    grid_b: np.ndarray,
    cosine: dict[int, float],
    path: str | os.PathLike,
    *,
    vocab_size: int,
    names: tuple[str, str] = ("view a", "view b"),
    title: str = "",
) -> None:
    """PNG: the two token grids as colors (same color = same index) and the feature cosine per step."""
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(9, 3))
    for ax, g, name in zip(axes[:2], (grid_a, grid_b), names):
        ax.imshow(codes_to_colors(g, vocab_size), interpolation="nearest")
        ax.set_title(name, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    steps = sorted(cosine)
    axes[2].plot(steps, [cosine[s] for s in steps], marker="o")
    axes[2].set_xlabel("step")
    axes[2].set_ylabel("feature cosine")
    axes[2].grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
