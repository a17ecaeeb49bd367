"""Linear probe on per-step GPT features (the paper's understanding measure, MAE protocol shortened).

The feature at step t is the hidden state of one block after the model has consumed t image tokens:
position t of the sequence [class, x_0, ..., x_{T-1}] (position 0, the class slot, has consumed none).
The class slot holds the null class, so the true label cannot leak into the features. Only the first
crop of each image (codes[i, 0]) is used: the probe measures the representation, not augmentation.

The head is MAE's: BatchNorm1d without affine parameters (standardises the features) then a Linear,
trained with SGD + momentum and a cosine learning-rate schedule (MAE uses LARS at batch 16384; plain
SGD is enough at the batch sizes used here).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

from ..data.codes import map_codes, read_codes_labels, read_codes_meta
from ..data.views import CodesDataset
from ..models.gpt import GPT
from ..progress import progress_bar


def default_steps(num_tokens: int, n: int = 8) -> list[int]:
    """n evenly spaced steps ending at ``num_tokens``: 32, 64, ..., 256 for 256 tokens."""
    if not 1 <= n <= num_tokens:
        raise ValueError(f"cannot pick {n} distinct steps out of {num_tokens} tokens")
    return sorted({round(num_tokens * k / n) for k in range(1, n + 1)})


def first_view_codes(
    source: str | os.PathLike | CodesDataset, limit: int | None = None, view: int = 0
) -> tuple[Tensor, Tensor]:
    """(N, T) int64 codes of crop ``view`` of each image of an extraction folder, and (N,) labels.

    Images skipped as corrupt (label -1) are left out, as in CodesDataset; ``limit`` keeps the first N.
    """
    folder = source.folder if isinstance(source, CodesDataset) else os.fspath(source)
    meta = read_codes_meta(folder)
    if not 0 <= view < meta["num_crops"]:
        raise ValueError(f"view {view} out of range: {folder} has {meta['num_crops']} crops per image")
    rows, labels = read_codes_labels(folder)
    picked = map_codes(folder)[rows[:limit], view].astype(np.int64)  # (n, T), copied out of the (N, K, T) map
    return torch.from_numpy(picked), torch.from_numpy(labels[:limit])


@torch.no_grad()
def extract_step_features(
    model: GPT,
    codes: Tensor | str | os.PathLike | CodesDataset,
    steps: Sequence[int],
    layer: int,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    *,
    labels: Tensor | None = None,
    limit: int | None = None,
    progress: bool = True,
) -> tuple[dict[int, Tensor], Tensor | None]:
    """Features of block ``layer`` at each step, conditioned on the null class.

    ``codes``: an (N, T) tensor of token indices (then ``labels`` is passed through), or an extraction
    folder / CodesDataset (first crop of each image; labels read from the folder).
    Returns ({step: (N, dim) float32 on the CPU}, labels).
    """
    if not isinstance(codes, Tensor):
        codes, labels = first_view_codes(codes, limit)
    elif limit is not None:
        codes = codes[:limit]
        labels = labels[:limit] if labels is not None else None
    T = codes.shape[1]
    steps = sorted(set(int(s) for s in steps))
    if not steps or steps[0] < 0 or steps[-1] > T:
        raise ValueError(f"steps must lie in [0, {T}] (tokens per image), got {steps}")
    if not 0 <= layer <= model.config.n_layer:
        raise ValueError(f"layer must lie in [0, {model.config.n_layer}], got {layer}")
    was_training = model.training
    model.eval()
    # causal attention: positions up to the last step only need the tokens before it
    feed = steps[-1]
    out: dict[int, list[Tensor]] = {s: [] for s in steps}
    index = torch.tensor(steps, device=device)
    try:
        for i in progress_bar(range(0, len(codes), batch_size), desc="features", unit="batch", disable=not progress):
            tokens = codes[i : i + batch_size, :feed].to(device)  # (b, feed)
            null = torch.full((tokens.shape[0],), model.config.null_class, dtype=torch.long, device=device)
            h = model(tokens, null, return_hidden=(layer,), logits=False).hidden[layer]  # (b, 1 + feed, dim)
            picked = h[:, index].float().cpu()  # (b, len(steps), dim)
            for j, s in enumerate(steps):
                out[s].append(picked[:, j])
    finally:
        model.train(was_training)
    return {s: torch.cat(v) for s, v in out.items()}, labels


class ProbeHead(nn.Sequential):
    """MAE's linear-probe head: BatchNorm1d (no affine, standardises features) then Linear."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__(nn.BatchNorm1d(dim, affine=False, eps=1e-6), nn.Linear(dim, num_classes))


def train_linear_probe(
    train_feats: Tensor,
    train_labels: Tensor,
    test_feats: Tensor,
    test_labels: Tensor,
    epochs: int = 20,
    lr: float = 0.1,
    batch_size: int = 256,
    seed: int = 0,
    *,
    num_classes: int | None = None,
    weight_decay: float = 0.0,
    device: str | torch.device = "cpu",
) -> float:
    """Top-1 accuracy (in [0, 1]) on the test split of a linear probe trained on the train split.

    SGD (momentum 0.9) with a cosine schedule over all steps; the head is initialised and the batches
    shuffled from ``seed`` alone, so the same inputs give the same accuracy.
    """
    if len(train_feats) != len(train_labels) or len(test_feats) != len(test_labels):
        raise ValueError("features and labels differ in length")
    if num_classes is None:
        num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    generator = torch.Generator().manual_seed(seed)
    head = ProbeHead(train_feats.shape[1], num_classes)
    linear = head[1]
    # MAE: trunc_normal(std 0.01) weights, zero bias; drawn from our generator, not the global RNG
    nn.init.trunc_normal_(linear.weight, std=0.01, generator=generator)
    nn.init.zeros_(linear.bias)
    head = head.to(device)
    opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    n = len(train_feats)
    per_epoch = math.ceil(n / batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: 0.5 * (1 + math.cos(math.pi * step / (epochs * per_epoch)))
    )
    x_train, y_train = train_feats.float(), train_labels.long()
    head.train()
    for _ in range(epochs):
        order = torch.randperm(n, generator=generator)
        for i in range(0, n, batch_size):
            idx = order[i : i + batch_size]
            if len(idx) < 2:  # BatchNorm needs two samples to normalise a batch
                continue
            loss = nn.functional.cross_entropy(head(x_train[idx].to(device)), y_train[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    head.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(test_feats), 1024):
            pred = head(test_feats[i : i + 1024].float().to(device)).argmax(-1).cpu()
            correct += int((pred == test_labels[i : i + 1024].long()).sum())
    return correct / max(len(test_feats), 1)


class ProbeCurve(NamedTuple):
    accuracy: dict[int, float]  # step -> top-1 in [0, 1]
    num_train: int
    num_test: int


def probe_curve(
    model: GPT,
    train: tuple[Tensor, Tensor] | str | os.PathLike,
    test: tuple[Tensor, Tensor] | str | os.PathLike,
    *,
    layer: int,
    steps: Sequence[int] | None = None,
    max_train: int | None = None,
    max_test: int | None = None,
    batch_size: int = 64,
    epochs: int = 20,
    lr: float = 0.1,
    probe_batch_size: int = 256,
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> ProbeCurve:
    """Linear-probe top-1 accuracy at each step: features of block ``layer`` on the train and test codes
    ((codes, labels) tensors or extraction folders), one probe per step."""
    steps = steps or default_steps(model.config.block_size)
    extract = dict(steps=steps, layer=layer, batch_size=batch_size, device=device, progress=progress)

    def features(source, limit):
        if isinstance(source, tuple):
            return extract_step_features(model, source[0], labels=source[1], limit=limit, **extract)
        return extract_step_features(model, source, limit=limit, **extract)

    train_feats, y_train = features(train, max_train)
    test_feats, y_test = features(test, max_test)
    num_classes = int(max(y_train.max(), y_test.max())) + 1
    accuracy = {
        s: train_linear_probe(
            train_feats[s],
            y_train,
            test_feats[s],
            y_test,
            epochs=epochs,
            lr=lr,
            batch_size=probe_batch_size,
            seed=seed,
            num_classes=num_classes,
            device=device,
        )
        for s in sorted(train_feats)
    }
    return ProbeCurve(accuracy, len(y_train), len(y_test))


def plot_probe(results: dict[str, dict[int, float]], path: str | os.PathLike, title: str = "") -> None:
    """Accuracy vs step, one line per model (``results``: label -> {step: accuracy in [0, 1]})."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for label, acc in results.items():
        steps = sorted(acc)
        ax.plot(steps, [100 * acc[s] for s in steps], marker="o", label=label)
    ax.set_xlabel("step (image tokens consumed)")
    ax.set_ylabel("linear probe top-1 (%)")
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
