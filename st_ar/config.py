"""Run configuration: typed dataclasses, named presets, and dotted command-line overrides.

    cfg = preset("demo-mnist-star")
    cfg = apply_overrides(cfg, ["objective.mask_ratio=0.35", "optim.batch_size=64"])

Every override is checked against the field's type, and a name that does not exist is an error
(with the closest names); the parser is st_ar/settings.py's, which every command with settings
uses. The resolved configuration is written into the run folder and into every checkpoint
(``to_dict`` / ``from_dict``). The sections live next to the code they configure: ``objective`` in
st_ar/objectives/settings.py, ``teacher`` in st_ar/teacher.py; the rest here. Importing this
module does not import torch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

from .objectives.settings import ObjectiveConfig
from .settings import apply_settings, build, parse_value
from .teacher import TeacherConfig

__all__ = [
    "BASELINE",
    "PRESETS",
    "DataConfig",
    "ModelConfig",
    "ObjectiveConfig",
    "OptimConfig",
    "RunConfig",
    "TeacherConfig",
    "TrainConfig",
    "apply_overrides",
    "from_dict",
    "parse_value",  # re-exported: settings.parse_value
    "preset",
    "to_dict",
]


@dataclass
class ModelConfig:
    name: str = "GPT-S"  # a GPT preset (GPT-debug, GPT-T, GPT-S, GPT-B, GPT-L, GPT-XL, GPT-XXL, GPT-XXXL, GPT-3B)
    args: dict[str, Any] = field(default_factory=dict)  # GPTConfig / LlamaGen ModelArgs fields to override
    init_from: str | None = None  # GPT checkpoint to fine-tune from (ours or LlamaGen's); projector starts fresh
    trust_checkpoint: bool = False  # allow arbitrary pickled objects in init_from and the resumed checkpoint


@dataclass
class DataConfig:
    codes: str = ""  # folder written by `st-ar extract` (codes.npy, labels.npy, meta.json)
    num_workers: int = 2
    same_orientation_views: bool = False  # the views of an image both unmirrored or both mirrored (ten crops)


@dataclass
class OptimConfig:
    lr: float = 1e-4  # per 256 images of global batch (scaled linearly when scale_lr)
    scale_lr: bool = True
    batch_size: int = 256  # global images per optimizer step (each brings num_views sequences)
    grad_accum: int = 1  # micro-batches per step on each rank
    beta1: float = 0.9
    beta2: float = 0.95
    weight_decay: float = 0.05  # on weights with >= 2 dims only (not norms)
    grad_clip: float = 1.0  # 0 disables

    def effective_lr(self) -> float:
        return self.lr * self.batch_size / 256 if self.scale_lr else self.lr


@dataclass
class TrainConfig:
    out_dir: str = "runs/default"
    steps: int = 1000
    log_every: int = 10
    save_every: int = 500  # checkpoint every N steps (and always at the end or on Ctrl-C)
    # steps whose student (and teacher) are kept as OUT/exports/step_N/{model,ema}.pt: a run measured along
    # its course (the compute study evaluates these)
    export_steps: list[int] = field(default_factory=list)
    seed: int = 0
    device: str = "auto"  # auto: this rank's GPU when CUDA is available, else CPU
    precision: str = "auto"  # auto (bf16 autocast on GPU, fp32 on CPU) | fp32 | bf16
    parallel: str = "ddp"  # ddp | fsdp (shards student and teacher; for XXL and 3B)
    compile: bool = False  # torch.compile the student
    activation_checkpointing: bool = False
    sample_every: int = 0  # write a sample grid (OUT/samples/step_N.png, TensorBoard) every N steps; 0: never
    sample_tokenizer: str = ""  # VQ checkpoint that decodes the grid; default: the one the codes came from
    sample_cfg_scale: float = 2.0


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    # Settings a resumed run may change; anything else would silently make it a different run.
    CHANGEABLE_ON_RESUME: ClassVar[tuple[str, ...]] = (
        "train.steps",
        "train.log_every",
        "train.save_every",
        "train.export_steps",  # copies of the weights; the run itself is the same
        "data.num_workers",
        "data.codes",  # the codes' identity is checked on its own (data/codes.py codes_identity)
        "train.out_dir",
        "train.compile",
        "train.sample_every",  # previews never touch the weights or the random streams
        "train.sample_tokenizer",
        "train.sample_cfg_scale",
        "model.trust_checkpoint",  # how files are read, not what is trained
    )

    def __post_init__(self):
        # reject incompatible combinations up front, not a thousand steps in
        if self.train.precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"train.precision must be auto, fp32 or bf16, got {self.train.precision!r}")
        if self.train.parallel not in ("ddp", "fsdp"):
            raise ValueError(f"train.parallel must be ddp or fsdp, got {self.train.parallel!r}")
        if self.optim.batch_size < 1 or self.optim.grad_accum < 1:
            raise ValueError("optim.batch_size and optim.grad_accum must be >= 1")
        for name in ("log_every", "save_every", "steps"):
            if getattr(self.train, name) < 1:
                raise ValueError(f"train.{name} must be >= 1")
        if self.train.sample_every < 0:
            raise ValueError("train.sample_every must be >= 0 (0: no sample grids)")
        if any(not 1 <= s <= self.train.steps for s in self.train.export_steps):
            raise ValueError(f"train.export_steps must lie in [1, train.steps={self.train.steps}]")


def to_dict(cfg: RunConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def from_dict(d: dict[str, Any]) -> RunConfig:
    return build(RunConfig, d)


# ----------------------------------------------------------------------------- overrides


def apply_overrides(cfg: RunConfig, overrides: list[str]) -> RunConfig:
    """Return a copy of ``cfg`` with ``section.field=value`` overrides applied and validated."""
    return apply_settings(cfg, overrides)


# ----------------------------------------------------------------------------- presets

BASELINE = dict(mim=False, step=False, view=False, num_views=1)


NO_DROPOUT = dict(token_dropout_p=0.0, resid_dropout_p=0.0, ffn_dropout_p=0.0)


def _demo(dataset: str, star: bool) -> RunConfig:
    """CPU demo on MNIST-like data (what `st-ar demo` trains): GPT-T over the 8x8 tokens of the VQ-mnist
    tokenizer (512 codes), 32 sequences per step for both: 32 images x 1 view, or 16 images x 2 views."""
    cfg = RunConfig()
    # no dropout: in a run of a few thousand steps it only slows learning
    cfg.model = ModelConfig(name="GPT-T", args=dict(vocab_size=512, block_size=64, num_classes=10, **NO_DROPOUT))
    cfg.data = DataConfig(codes=f"runs/demo/{dataset}/codes", num_workers=0)
    cfg.objective = ObjectiveConfig(projector_hidden=512) if star else ObjectiveConfig(**BASELINE)
    # a few thousand steps: the paper's 0.9999 would leave the teacher at its initial weights
    cfg.teacher = TeacherConfig(ema_decay=0.999, ema_schedule="cosine", ema_start=0.99)
    cfg.optim = OptimConfig(lr=2e-3, scale_lr=False, batch_size=16 if star else 32)
    cfg.train = TrainConfig(
        out_dir=f"runs/demo/{dataset}/{'star' if star else 'baseline'}", steps=1500, save_every=500, log_every=20
    )
    return cfg


def _imagenet(size: str, star: bool) -> RunConfig:
    """ImageNet 256 px as in the paper: VQ-16 codes (16x16 grid), batch 256, lr 1e-4, 50 epochs."""
    cfg = RunConfig()
    cfg.model = ModelConfig(name=f"GPT-{size}")
    cfg.data = DataConfig(codes="data/imagenet256_codes", num_workers=8)
    cfg.objective = ObjectiveConfig() if star else ObjectiveConfig(**BASELINE)
    cfg.optim = OptimConfig(batch_size=256)
    steps = 50 * 1_281_167 // 256  # 50 epochs
    cfg.train = TrainConfig(
        out_dir=f"runs/imagenet_{size.lower()}_{'star' if star else 'baseline'}",
        steps=steps,
        save_every=5000,
        log_every=100,
        parallel="fsdp" if size in ("XXL", "3B") else "ddp",
    )
    return cfg


PRESETS = {
    "debug": lambda: _debug(),
    "demo-mnist-baseline": lambda: _demo("mnist", False),
    "demo-mnist-star": lambda: _demo("mnist", True),
    "demo-fashion-baseline": lambda: _demo("fashion-mnist", False),
    "demo-fashion-star": lambda: _demo("fashion-mnist", True),
    **{
        f"imagenet-{size.lower()}-{kind}": (lambda size=size, star=(kind == "star"): _imagenet(size, star))
        for size in ("B", "L", "XL", "XXL", "3B")
        for kind in ("baseline", "star")
    },
}


def _debug() -> RunConfig:
    """A few seconds on CPU: tests and smoke runs (GPT-debug, 4x4 tokens, vocabulary 64)."""
    cfg = _demo("mnist", True)
    cfg.model = ModelConfig(name="GPT-debug", args=dict(vocab_size=64, block_size=16, num_classes=10))
    cfg.objective = ObjectiveConfig(projector_hidden=64)
    cfg.optim = OptimConfig(lr=1e-3, scale_lr=False, batch_size=8)
    cfg.train = TrainConfig(out_dir="runs/debug", steps=10, save_every=5, log_every=1)
    return cfg


def preset(name: str) -> RunConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}")
    return PRESETS[name]()
