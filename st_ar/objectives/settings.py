"""``ObjectiveConfig``: the ``objective`` section of a run's configuration (the losses of
total.py's STARObjective). No torch here, so ``st_ar.config`` reads it without loading torch."""

from __future__ import annotations

from dataclasses import dataclass

AR_LOSS_ON = ("all", "unmasked")


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
    # the variants the paper leaves open (docs/training.md); each default is the paper's step
    student_views: int | None = None  # views per image the student trains on (the first ones); None = all
    masked_share: float = 1.0  # share of the student's sequences that get the key mask (and L_MIM)
    ar_loss_on: str = "all"  # "all": L_AR on every student sequence; "unmasked": on the unmasked ones only
    ssl_until: float = 1.0  # fraction of train.steps after which the step is plain next-token

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
        if self.student_views is not None:
            if not 1 <= self.student_views <= self.num_views:
                raise ValueError(f"objective.student_views must lie in [1, num_views={self.num_views}] or be none")
            if self.student_views < self.num_views and not self.needs_teacher:
                raise ValueError("objective.student_views below num_views needs a self-supervised loss")
        if not 0.0 < self.masked_share <= 1.0:
            raise ValueError(f"objective.masked_share must lie in (0, 1], got {self.masked_share}")
        if self.ar_loss_on not in AR_LOSS_ON:
            raise ValueError(f"objective.ar_loss_on must be all or unmasked, got {self.ar_loss_on!r}")
        if self.ar_loss_on == "unmasked" and not (self.mim and self.masked_share < 1.0):
            raise ValueError("objective.ar_loss_on=unmasked needs objective.mim and objective.masked_share < 1")
        if not 0.0 < self.ssl_until <= 1.0:
            raise ValueError(f"objective.ssl_until must lie in (0, 1], got {self.ssl_until}")

    @property
    def needs_teacher(self) -> bool:
        return self.mim or self.step or self.view

    @property
    def contrastive(self) -> bool:
        return self.step or self.view

    @property
    def views_of_student(self) -> int:
        """Sequences per image the student runs: the first ``student_views`` views (all by default)."""
        return self.num_views if self.student_views is None else self.student_views

    def masked_sequences(self, n: int) -> int:
        """How many of a micro-batch's ``n`` student sequences get the key mask: all, or
        round(masked_share * n), at least one, and (ar_loss_on=unmasked) at least one left unmasked."""
        if self.masked_share >= 1.0:
            return n
        k = max(1, round(self.masked_share * n))
        if self.ar_loss_on == "unmasked":
            if n < 2:
                raise ValueError("objective.ar_loss_on=unmasked needs at least 2 student sequences per micro-batch")
            k = min(k, n - 1)
        return k

    def ssl_steps(self, total_steps: int) -> int:
        """The steps of a run of ``total_steps`` that train with the self-supervised losses (the first ones)."""
        return total_steps if self.ssl_until >= 1.0 else round(self.ssl_until * total_steps)

    def ssl_on(self, step: int, total_steps: int) -> bool:
        """Whether the step after ``step`` done ones trains with the teacher: always with ssl_until = 1
        (whatever the step), else while ``step < ssl_steps(total_steps)``."""
        if self.ssl_until >= 1.0:
            return self.needs_teacher
        return self.needs_teacher and step < self.ssl_steps(total_steps)

    def layer(self, n_layer: int) -> int:
        layer = self.contrastive_layer if self.contrastive_layer is not None else n_layer // 2
        if not 1 <= layer <= n_layer:
            raise ValueError(f"objective.contrastive_layer must lie in [1, {n_layer}], got {layer}")
        return layer
