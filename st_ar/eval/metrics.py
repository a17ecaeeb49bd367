"""Sample-quality metrics on feature vectors: FID, KID, improved precision/recall, Inception Score.

Everything here is plain math on (N, D) arrays; which network makes the features is up to the caller
(st_ar/eval/inception.py for the ImageNet metrics, st_ar/eval/domain.py for small datasets).
"""

from __future__ import annotations

import numpy as np
import torch


def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and covariance (D, D) of (N, D) features, in float64."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or len(f) < 2:
        raise ValueError(f"need (N, D) features with N >= 2, got shape {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6
) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 sqrt(S1 S2)) between two Gaussians.

    Tr sqrt(S1 S2) is computed as the sum of sqrt(eigenvalues) of the symmetric R S2 R, R = S1^(1/2):
    the same eigenvalues as S1 S2 for covariance matrices, so the same value as the ADM evaluator's
    scipy.linalg.sqrtm (tests/test_metrics.py checks it against the direct formula), faster, and exact
    for singular covariances (fewer samples than dimensions), where sqrtm needs an ``eps`` on the diagonal.
    ``eps`` is kept for that fallback only if the eigen-decomposition fails.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(
            f"mismatched statistics: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape}"
        )
    diff = mu1 - mu2
    try:
        trace_sqrt = _trace_sqrt_product(sigma1, sigma2)
    except np.linalg.LinAlgError:
        offset = np.eye(len(sigma1)) * eps
        trace_sqrt = _trace_sqrt_product(sigma1 + offset, sigma2 + offset)
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt)


def _trace_sqrt_product(a: np.ndarray, b: np.ndarray) -> float:
    """Tr sqrt(A B) for symmetric positive semi-definite A, B; rounding's tiny negative eigenvalues count as 0."""
    w, v = np.linalg.eigh((a + a.T) / 2)
    root_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = root_a @ b @ root_a
    return float(np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum())


def kid(
    feats_a: np.ndarray, feats_b: np.ndarray, subsets: int = 100, subset_size: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """Kernel Inception Distance: mean and std over random subsets of the unbiased MMD^2 estimate.

    Kernel k(x, y) = (x.y / d + 1)^3. Each subset draws ``subset_size`` rows (fewer if a set is smaller)
    from each side without replacement; the unbiased estimator leaves out the k(x, x) diagonal terms,
    so two samples of one distribution average to ~0 (and single subsets may go negative).
    """
    a, b = np.asarray(feats_a, np.float64), np.asarray(feats_b, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"need (N, D) features of one width, got {a.shape} and {b.shape}")
    m = min(subset_size, len(a), len(b))
    if m < 2:
        raise ValueError("KID needs at least 2 samples on each side")
    d = a.shape[1]
    rng = np.random.default_rng(seed)
    values = np.empty(subsets)
    for s in range(subsets):
        x = a[rng.choice(len(a), m, replace=False)]
        y = b[rng.choice(len(b), m, replace=False)]
        kxx = (x @ x.T / d + 1) ** 3
        kyy = (y @ y.T / d + 1) ** 3
        kxy = (x @ y.T / d + 1) ** 3
        within = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1))
        values[s] = within - 2 * kxy.mean()
    return float(values.mean()), float(values.std())


def _pairwise_sq_dists(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    # ||x||^2 + ||y||^2 - 2 x.y; clamp the rounding negatives
    return ((x * x).sum(1, keepdim=True) + (y * y).sum(1)[None] - 2 * x @ y.T).clamp_min_(0)


def _knn_radii(x: torch.Tensor, k: int, batch: int) -> torch.Tensor:
    """Squared distance from each row to its k-th nearest other row (index k after the row itself at 0)."""
    if len(x) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} samples per set, got {len(x)}")
    out = torch.empty(len(x), dtype=x.dtype)
    for i in range(0, len(x), batch):
        d = _pairwise_sq_dists(x[i : i + batch], x)
        out[i : i + batch] = d.kthvalue(k + 1, dim=1).values
    return out


def _inside_any_ball(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, batch: int) -> torch.Tensor:
    inside = torch.empty(len(points), dtype=torch.bool)
    for i in range(0, len(points), batch):
        d = _pairwise_sq_dists(points[i : i + batch], centres)
        inside[i : i + batch] = (d <= radii[None]).any(dim=1)
    return inside


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3, batch: int = 1000) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019), as the ADM evaluator computes them.

    Each set's manifold is the union of balls around its points, a ball's radius being the distance to
    the point's k-th nearest neighbour in its own set. Precision: the share of fake samples inside the
    real manifold; recall: the share of real samples inside the fake manifold. Distances are computed
    ``batch`` rows at a time, so memory stays O(batch * N).
    """
    r = torch.as_tensor(np.asarray(real), dtype=torch.float64)
    f = torch.as_tensor(np.asarray(fake), dtype=torch.float64)
    if r.ndim != 2 or f.ndim != 2 or r.shape[1] != f.shape[1]:
        raise ValueError(f"need (N, D) features of one width, got {tuple(r.shape)} and {tuple(f.shape)}")
    real_radii, fake_radii = _knn_radii(r, k, batch), _knn_radii(f, k, batch)
    precision = _inside_any_ball(f, r, real_radii, batch).double().mean().item()
    recall = _inside_any_ball(r, f, fake_radii, batch).double().mean().item()
    return precision, recall


def inception_score(probs: np.ndarray, splits: int = 10) -> tuple[float, float]:
    """exp(E_x KL(p(y|x) || p(y))) per split of (N, C) class probabilities; mean and std over splits."""
    p = np.asarray(probs, np.float64)
    if p.ndim != 2 or len(p) < splits:
        raise ValueError(f"need (N, C) probabilities with N >= splits={splits}, got shape {p.shape}")
    scores = []
    for part in np.array_split(p, splits):
        marginal = part.mean(axis=0, keepdims=True)
        # 0 * log 0 = 0: probabilities that are exactly 0 add nothing
        kl = np.where(part > 0, part * (np.log(np.maximum(part, 1e-300)) - np.log(np.maximum(marginal, 1e-300))), 0)
        scores.append(np.exp(kl.sum(axis=1).mean()))
    return float(np.mean(scores)), float(np.std(scores))
