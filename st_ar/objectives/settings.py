"""``ObjectiveConfig``: the ``objective`` section of a run's configuration (the losses of
total.py's STARObjective). No torch here, so ``st_ar.config`` reads it without loading torch."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ObjectiveConfig:
    """Self-supervised losses of ST-AR (SPEC section 3); paper values unless noted."""

    mim: bool = True  # L_MIM: masked-attention student vs EMA teacher, last block
    step: bool = True  # L_step: InfoNCE across steps of one image
    view: bool = True  # L_view: InfoNCE across views (crops) of one image
    num_views: int = 2  # M crops of each image per batch; 1 for the LlamaGen baseline
    mask_ratio: float = 0.25  # share of the T input slots hidden as keys (0.15-0.45 all work in the paper)
    num_steps: int = 4  # K positions per sequence for the contrastive losses
    contrastive_layer: int | None = None  # block whose output is contrasted; None = depth // 2
    mim_weight: float = 1.0  # alpha
    contrastive_weight: float = 0.5  # beta
    temperature: float = 0.2  # InfoNCE tau; not given by the paper (our default: MoCo v3's)
    label_dropout: float = 0.1  # CFG: label -> null class, once per image (all its views)
    gather_negatives: bool = True  # under data parallelism, teacher targets of every rank are negatives
    projector_hidden: int = 2048
    projector_layers: int = 3

    def __post_init__(self):
        if self.num_views < 1:
            raise ValueError("objective.num_views must be >= 1")
        if self.view and self.num_views < 2:
            raise ValueError("objective.view needs objective.num_views >= 2 (two crops of each image)")
        if self.step and self.num_steps < 2:
            raise ValueError("objective.step needs objective.num_steps >= 2")
        if not 0.0 <= self.mask_ratio < 1.0:
            raise ValueError(f"objective.mask_ratio must lie in [0, 1), got {self.mask_ratio}")
        if self.temperature <= 0:
            raise ValueError("objective.temperature must be positive")

    @property
    def needs_teacher(self) -> bool:
        return self.mim or self.step or self.view

    @property
    def contrastive(self) -> bool:
        return self.step or self.view

    def layer(self, n_layer: int) -> int:
        layer = self.contrastive_layer if self.contrastive_layer is not None else n_layer // 2
        if not 1 <= layer <= n_layer:
            raise ValueError(f"objective.contrastive_layer must lie in [1, {n_layer}], got {layer}")
        return layer
