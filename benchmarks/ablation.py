"""What the small-scale ablation runs: every run of the sweep, its settings, and where its result goes.

benchmarks/reproduce.py runs these (``plan()``, in order); benchmarks/results_report.py turns their result
files into docs/RESULTS.md; benchmarks/investigate.py re-samples some of them. This module only defines.

Every run trains the same GPT (GPT-T: 4 blocks, width 128, over the 8x8 tokens of a VQ tokenizer trained
on the dataset) for the same steps on the same images per step, from the demo-mnist-star preset with the
objective and teacher changed as each run says. The tokenizer, the codes, the sampling and the evaluation
are the same for every run of a dataset (TOKENIZER, CODES, SAMPLING, EVALUATION below: arguments of the
st_ar/pipeline.py stages).
"""

from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from st_ar.config import BASELINE, RunConfig  # noqa: E402
from st_ar.models.gpt import GPT_PRESETS  # noqa: E402
from st_ar.pipeline import gpt_run_config  # noqa: E402

RESULTS = os.path.join(ROOT, "benchmarks", "results")
DATASETS = ("fashion-mnist", "mnist")
SEEDS = (0, 1)

PRESET = "demo-mnist-star"  # every run's settings before the changes below
MODEL = "GPT-T"  # 4 blocks, width 128, no dropout: the demo-mnist-* presets
DEPTH = GPT_PRESETS[MODEL]["n_layer"]
STEPS = 800
IMAGES_PER_STEP = 32
LR = 2e-3

# the data and the evaluation, shared by every run of a dataset (st_ar/pipeline.py's arguments)
TOKENIZER = dict(image_size=32, vq_preset="VQ-mnist", vq_args={}, steps=300, eval_images=1000, seed=0)
CODES = dict(image_size=32, train_images=10_000, test_images=2_000, crops="five", crop_range=1.1)
SAMPLING = dict(
    per_class=50,  # 500 samples per run
    batch_size=250,
    cfg_scale=1.0,  # the paper's ablation table is without guidance
    temperature=1.0,
)  # the seed is the run's
EVALUATION = dict(
    test_images=CODES["test_images"],
    classifier_images=10_000,
    classifier_epochs=2,
    fid_samples=500,
    probe_train_images=5_000,
    probe_epochs=20,
    seed=0,  # the same classifier, reference images and probe for every run
)

VARIANTS = {
    "baseline": dict(BASELINE),
    "mim": dict(mim=True, step=False, view=False, num_views=2),
    "mim-step": dict(mim=True, step=True, view=False, num_views=2),
    "mim-view": dict(mim=True, step=False, view=True, num_views=2),
    "star": dict(mim=True, step=True, view=True, num_views=2),
}


# cosine EMA schedules besides the preset's 0.99 -> 0.999 (the star run)
EMA_SCHEDULES = {"ema-fast": dict(ema_start=0.9, ema_decay=0.99), "ema-slow": dict(ema_start=0.999, ema_decay=0.9999)}
# the Fashion-MNIST sweeps' values besides the star run's (mask 0.25, layer 2 of 4, K = 4)
MASK_RATIOS = (0.15, 0.35, 0.45)
LAYER_QUARTERS = (1, 3, 4)  # contrastive layer DEPTH * q // 4
CONTRASTED_STEPS = (2, 8, 16)


@dataclass
class Run:
    dataset: str
    name: str  # e.g. star-s0, mask0.35-s0
    seed: int
    objective: dict
    teacher: dict = dataclasses.field(default_factory=dict)  # TeacherConfig fields other than the preset's
    steps: int = STEPS
    equal_compute: bool = False
    grid: bool = False  # keep a sample grid in the results

    @property
    def key(self) -> str:
        return f"{self.dataset}/{self.name}"

    @property
    def result_path(self) -> str:
        return os.path.join(RESULTS, self.dataset, f"{self.name}.json")

    def config(self, codes: str, out: str, steps: int | None = None) -> RunConfig:
        """The training run on ``codes`` into ``out``, for ``steps`` (default the run's own).

        The star preset with the baseline's objective builds no teacher or projector."""
        return gpt_run_config(
            PRESET,
            codes,
            out,
            model=MODEL,
            model_args={},
            batch_size=IMAGES_PER_STEP,
            lr=LR,
            steps=self.steps if steps is None else steps,
            log_every=20,
            precision="fp32",
            seed=self.seed,
            objective=self.objective,
            teacher=self.teacher,
        )


def calibration_path(dataset: str) -> str:
    """The equal-compute calibration of ``dataset`` (benchmarks/reproduce.py writes it before the first
    baseline-ec run)."""
    return os.path.join(RESULTS, dataset, "calibration.json")


def plan() -> list[Run]:
    """Every run, in the order the sweep takes them: the main comparison first, so a partial sweep
    already answers the main question."""

    def variant(dataset: str, name: str, seed: int) -> Run:
        if name == "baseline-ec":
            return Run(dataset, f"{name}-s{seed}", seed, dict(BASELINE), equal_compute=True, grid=seed == 0)
        return Run(dataset, f"{name}-s{seed}", seed, dict(VARIANTS[name]), grid=seed == 0)

    def star(name: str, seed: int, teacher: str = "", **objective) -> Run:  # ST-AR on the main set, changed
        teacher_changes = dict(EMA_SCHEDULES[teacher]) if teacher else {}
        return Run(DATASETS[0], f"{name}-s{seed}", seed, dict(VARIANTS["star"], **objective), teacher_changes)

    def masks(seed: int) -> list[Run]:
        return [star(f"mask{ratio}", seed, mask_ratio=ratio) for ratio in MASK_RATIOS]

    def layers(seed: int) -> list[Run]:
        return [star(f"layer{q}of4", seed, contrastive_layer=DEPTH * q // 4) for q in LAYER_QUARTERS]

    def contrasted_steps(seed: int) -> list[Run]:  # the paper's fourth sweep, K
        return [star(f"k{k}", seed, num_steps=k) for k in CONTRASTED_STEPS]

    runs = []
    for dataset in DATASETS:
        runs += [variant(dataset, name, seed) for seed in SEEDS for name in ("baseline", "star", "baseline-ec")]
        runs += [variant(dataset, name, seed) for seed in SEEDS for name in ("mim", "mim-step", "mim-view")]
        if dataset == DATASETS[0]:
            # the faster teacher tests the stale-teacher explanation
            runs += masks(0) + layers(0) + [star("ema-fast", 0, teacher="ema-fast")]
    # then: a second seed of the faster teacher (it moved FID the most), the slower teacher
    runs += [star("ema-fast", 1, teacher="ema-fast"), star("ema-slow", 0, teacher="ema-slow")]
    # last: the two settings that helped, together (the faster teacher and the lowest mask ratio),
    # and second seeds of the one-seed sweeps, whose differences are of the order of the seed spread
    runs += [star("mask0.15-ema-fast", seed, teacher="ema-fast", mask_ratio=0.15) for seed in SEEDS]
    runs += masks(1) + layers(1) + contrasted_steps(0) + contrasted_steps(1)
    return runs + [star("ema-slow", 1, teacher="ema-slow")]
