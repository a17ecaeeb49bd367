"""The one settings syntax (st_ar/settings.py) on nested and flat dataclasses, the one resume rule,
and a configuration that loads without torch."""

import dataclasses
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from st_ar.config import RunConfig, apply_overrides, preset, to_dict
from st_ar.settings import apply_settings, parse_settings, resume_differences, with_defaults


@dataclass
class Flat:
    steps: int = 10
    lr: float = 1e-3
    name: str | None = None
    tags: list[str] = field(default_factory=list)
    args: dict = field(default_factory=dict)
    on: bool = False

    def __post_init__(self):
        if self.steps < 0:
            raise ValueError("steps must be >= 0")


def test_importing_the_config_does_not_import_torch():
    code = "import sys, st_ar.config, st_ar.settings; print('torch' in sys.modules)"
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, check=True)
    assert done.stdout.strip() == "False"


def test_flat_dataclass_takes_typed_field_values():
    cfg = apply_settings(Flat(), ["steps=3", "lr=0.5", "name=none", "on=yes", 'args={"a": 1}', "tags=x=1"])
    assert cfg == Flat(steps=3, lr=0.5, name=None, tags=["x=1"], args={"a": 1}, on=True)
    assert apply_settings(Flat(), ['tags=["a", "b"]']).tags == ["a", "b"]  # a JSON list, or one value
    assert parse_settings(Flat, ["--steps=4", "steps=5"]) == {"steps": 5}  # the later one wins
    with pytest.raises(ValueError, match="unknown setting 'step'; did you mean steps"):
        apply_settings(Flat(), ["step=3"])
    with pytest.raises(ValueError, match="steps expects int, got 'x'"):
        apply_settings(Flat(), ["steps=x"])
    with pytest.raises(ValueError, match="'steps' is not of the form field=value"):
        apply_settings(Flat(), ["steps"])
    with pytest.raises(ValueError, match="steps must be >= 0"):  # the dataclass's own checks run
        apply_settings(Flat(), ["steps=-1"])
    with pytest.raises(ValueError, match="args expects a JSON object"):
        apply_settings(Flat(), ["args=[1]"])


def test_nested_dataclass_takes_dotted_paths():
    cfg = apply_overrides(preset("debug"), ["objective.mask_ratio=0.35", "teacher.ema_schedule=warmup"])
    assert (cfg.objective.mask_ratio, cfg.teacher.ema_schedule) == (0.35, "warmup")
    with pytest.raises(ValueError, match=r"unknown setting 'train.stepz'; did you mean train.steps\?"):
        apply_overrides(cfg, ["train.stepz=3"])
    with pytest.raises(ValueError, match="unknown setting 'trian.steps'; did you mean train"):
        apply_overrides(cfg, ["trian.steps=3"])
    with pytest.raises(ValueError, match="'train' is a section"):
        apply_overrides(cfg, ["train=3"])
    with pytest.raises(ValueError, match="train.steps has no fields"):
        apply_overrides(cfg, ["train.steps.x=3"])
    with pytest.raises(ValueError, match="teacher.ema_schedule must be constant, cosine or warmup"):
        apply_overrides(cfg, ["teacher.ema_schedule=linear"])


def test_resume_differences_compare_by_path_and_skip_the_changeable():
    stored = {"train": {"steps": 10, "lr": 0.1}, "model": {"args": {"a": 1}}, "shape": (1, 2)}
    now = {"train": {"steps": 20, "lr": 0.2}, "model": {"args": {"a": 1, "b": 2}}, "shape": [1, 2]}
    assert resume_differences(stored, now, ["train.steps"]) == [
        ("model.args.b", None, 2),
        ("train.lr", 0.1, 0.2),
    ]
    assert resume_differences(stored, now, ["train", "model.args"]) == []


def test_a_setting_added_since_a_checkpoint_counts_as_its_default():
    stored = to_dict(preset("debug"))
    del stored["train"]["sample_every"], stored["teacher"]
    filled = with_defaults(stored, RunConfig)
    assert filled["train"]["sample_every"] == 0 and filled["teacher"] == dataclasses.asdict(RunConfig().teacher)
    assert filled["model"]["args"] == stored["model"]["args"]  # dict values are kept as they are
