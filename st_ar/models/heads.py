"""Student-only projector for the contrastive losses (SimSiam-style MLP)."""

from __future__ import annotations

from torch import Tensor, nn


class Projector(nn.Module):
    """``layers`` linear layers; every one but the last is followed by LayerNorm and GELU.

    LayerNorm rather than SimSiam's BatchNorm: it needs no cross-rank statistics and behaves the
    same at batch 8 on a laptop as at batch 256 on eight GPUs. The output width defaults to the
    model width, so projected student features and raw teacher features live in one space.
    """

    def __init__(self, dim: int, hidden: int = 2048, out: int | None = None, layers: int = 3):
        super().__init__()
        if layers < 1:
            raise ValueError(f"projector needs at least one layer, got {layers}")
        out = out or dim
        widths = [dim] + [hidden] * (layers - 1) + [out]
        blocks: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
            blocks.append(nn.Linear(a, b))
            if i < layers - 1:
                blocks += [nn.LayerNorm(b), nn.GELU()]
        self.net = nn.Sequential(*blocks)

    def forward(self, x: Tensor) -> Tensor:  # (..., dim) -> (..., out)
        return self.net(x)
