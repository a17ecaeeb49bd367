"""Run configuration: typed dataclasses, named presets, and dotted command-line overrides.

    cfg = preset("demo-mnist-star")
    cfg = apply_overrides(cfg, ["objective.mask_ratio=0.35", "optim.batch_size=64"])

Every override is checked against the field's type, and a name that does not exist is an error
(with the closest names). The resolved configuration is written into the run folder and into
every checkpoint (``to_dict`` / ``from_dict``).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from .objectives.total import ObjectiveConfig


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


@dataclass
class TeacherConfig:
    ema_decay: float = 0.9999  # paper; too slow for short runs (the teacher would barely move)
    ema_schedule: str = "constant"  # constant | cosine (from ema_start up to ema_decay) | warmup
    ema_start: float = 0.0  # first decay of the cosine schedule


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

    def __post_init__(self):
        # reject incompatible combinations up front, not a thousand steps in
        if self.train.precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"train.precision must be auto, fp32 or bf16, got {self.train.precision!r}")
        if self.train.parallel not in ("ddp", "fsdp"):
            raise ValueError(f"train.parallel must be ddp or fsdp, got {self.train.parallel!r}")
        if self.optim.batch_size < 1 or self.optim.grad_accum < 1:
            raise ValueError("optim.batch_size and optim.grad_accum must be >= 1")
        if self.teacher.ema_schedule not in ("constant", "cosine", "warmup"):
            raise ValueError(
                f"teacher.ema_schedule must be constant, cosine or warmup, got {self.teacher.ema_schedule!r}"
            )
        for name in ("log_every", "save_every", "steps"):
            if getattr(self.train, name) < 1:
                raise ValueError(f"train.{name} must be >= 1")
        if self.train.sample_every < 0:
            raise ValueError("train.sample_every must be >= 0 (0: no sample grids)")


def to_dict(cfg: RunConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def from_dict(d: dict[str, Any]) -> RunConfig:
    sections = {f.name: f.type for f in dataclasses.fields(RunConfig)}
    hints = typing.get_type_hints(RunConfig)
    unknown = set(d) - set(sections)
    if unknown:
        raise ValueError(f"unknown config section(s) {sorted(unknown)}")
    return RunConfig(**{name: hints[name](**d.get(name, {})) for name in sections})


# ----------------------------------------------------------------------------- overrides


def apply_overrides(cfg: RunConfig, overrides: list[str]) -> RunConfig:
    """Return a copy of ``cfg`` with ``section.field=value`` overrides applied and validated."""
    d = to_dict(cfg)
    hints = typing.get_type_hints(RunConfig)
    for item in overrides:
        key, sep, raw = item.lstrip("-").partition("=")
        if not sep:
            raise ValueError(f"override {item!r} is not of the form section.field=value")
        section, _, name = key.partition(".")
        if section not in d:
            raise ValueError(f"unknown config section {section!r} in {item!r}; sections: {', '.join(d)}")
        section_type = hints[section]
        fields = {f.name: f for f in dataclasses.fields(section_type)}
        if name not in fields:
            close = difflib.get_close_matches(name, fields, n=3)
            hint = f"; did you mean {', '.join(section + '.' + c for c in close)}?" if close else ""
            raise ValueError(f"unknown setting {key!r}{hint}")
        d[section][name] = parse_value(raw, typing.get_type_hints(section_type)[name], key)
    return from_dict(d)


def parse_value(raw: str, hint: Any, key: str) -> Any:
    """Parse ``raw`` as the annotated type: bool, int, float, str, dict (JSON), or X | None."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        if raw.lower() in ("none", "null"):
            return None
        return parse_value(raw, options[0], key)
    if hint is bool:
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{key} expects true/false, got {raw!r}")
    if hint in (int, float):
        try:
            return hint(raw)
        except ValueError:
            raise ValueError(f"{key} expects {hint.__name__}, got {raw!r}") from None
    if hint is str:
        return raw
    if origin is dict or hint is dict:
        try:
            value = json.loads(raw)
        except json.JSONDecodeError as e:
            raise ValueError(f"{key} expects a JSON object, got {raw!r} ({e})") from None
        if not isinstance(value, dict):
            raise ValueError(f"{key} expects a JSON object, got {raw!r}")
        return value
    raise ValueError(f"{key}: cannot parse a value of type {hint}")


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
