"""What the compute study runs: does ST-AR pay for its compute? Every run, its settings, its budget in
FLOPs, the compute points it is measured at, and where its result goes.

benchmarks/compute_study.py runs these (``plan()``, in order) and benchmarks/study_report.py writes the
compute section of docs/RESULTS.md from their result files. This module only defines.

Every method trains the ablation's GPT (GPT-T: 4 blocks, width 128, over the 8x8 tokens of the ablation's
VQ tokenizer) on all 60 000 training images, 32 images per step, for the same analytic training compute
(train/flops.py): the baseline's ``BUDGET_STEPS`` steps. A method that costs c times the baseline per
step trains BUDGET_STEPS / c steps. Each run keeps its weights at every eighth of the budget
(train.export_steps) and each of those is measured with one protocol (``EVALUATION``):

  every point          2 000 samples without guidance at temperature 1 -> class accuracy and domain FID
                       (the small CNN's features, against all 10 000 test images); the linear probe at
                       the 8 default steps
  INCEPTION_POINTS     the same samples' Inception FID against all 10 000 test images (cached statistics)
  the last point       (final runs) 2 000 guided samples (CFG 2.0): the same metrics

Inception features cost about 0.2 s an image on this 2-core machine, so Inception FID is taken at 4/8 and
8/8 of the budget in the screen and also at 6/8 in the final runs (the flatness criterion compares 6/8
with 8/8); domain FID at every point.

Fashion-MNIST is the main set (ten crops per image, as LlamaGen extracts ImageNet: mirrored crops make
the same-orientation variant meaningful); MNIST the second (five crops: a mirrored digit is not a digit).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from st_ar.config import BASELINE, RunConfig  # noqa: E402
from st_ar.pipeline import gpt_run_config  # noqa: E402

RESULTS = os.path.join(ROOT, "benchmarks", "results", "compute")
MAIN, SECOND = "fashion-mnist", "mnist"

PRESET = "demo-mnist-star"  # every run's settings before the changes below (the ablation's)
MODEL = "GPT-T"
IMAGES_PER_STEP = 32
LR = 2e-3
BUDGET_STEPS = 10_000  # the baseline's steps: 320 000 images, 5.3 epochs of 60 000
POINTS = 8  # compute points: every eighth of the budget
SCREEN_INCEPTION_POINTS = (4, 8)  # Inception FID at half and all of the budget
FINAL_INCEPTION_POINTS = (4, 6, 8)  # 6/8 for the flatness criterion (the last quarter)

CODES = {
    MAIN: dict(image_size=32, train_images=60_000, test_images=10_000, crops="ten", crop_range=1.1),
    SECOND: dict(image_size=32, train_images=60_000, test_images=10_000, crops="five", crop_range=1.1),
}
CODES_NAME = "codes-60k"
SAMPLES = 2_000
SAMPLING = dict(per_class=SAMPLES // 10, batch_size=250, temperature=1.0)
GUIDED_CFG = 2.0
EVALUATION = dict(
    classifier_images=None,  # the domain classifier trains on every training image
    classifier_epochs=2,
    probe_train_images=5_000,
    probe_test_images=5_000,
    probe_epochs=20,
    seed=0,  # the same classifier, reference statistics and probe for every run
)


def reference_path(dataset: str) -> str:
    """The Inception statistics of every test image of ``dataset``, committed the first time a study process
    computes them (half an hour on this CPU, in every session whose work folder was rebuilt) and read from
    then on."""
    return os.path.join(RESULTS, "reference", f"{dataset}-test-inception.npz")


STAR = dict(mim=True, step=True, view=True, num_views=2)
PAPER_TEACHER = dict(ema_start=0.99, ema_decay=0.999)  # the preset's cosine schedule
FAST_TEACHER = dict(ema_start=0.9, ema_decay=0.99)  # the ablation's best
BEST = dict(STAR, mask_ratio=0.15)  # with FAST_TEACHER: the ablation's best setting

# name: (objective changes, teacher changes, data changes); every variant below "star-best" changes only
# its own setting from star-best
METHODS: dict[str, tuple[dict, dict, dict]] = {
    "baseline": (dict(BASELINE), {}, {}),
    "star-paper": (dict(STAR), dict(PAPER_TEACHER), {}),
    "star-best": (dict(BEST), dict(FAST_TEACHER), {}),
    "star-one-view": (dict(BEST, student_views=1), dict(FAST_TEACHER), {}),
    "star-ar-unmasked": (dict(BEST, masked_share=0.5, ar_loss_on="unmasked"), dict(FAST_TEACHER), {}),
    "star-ssl-half": (dict(BEST, ssl_compute_share=0.5), dict(FAST_TEACHER), {}),
    "star-same-orientation": (dict(BEST), dict(FAST_TEACHER), dict(same_orientation_views=True)),
}
SCREEN_SEED = 0
FINAL_SEEDS = (1, 2, 3)  # seeds the screening did not use
SECOND_SEEDS = (1, 2)
# A fourth seed of the main pair on the main set, added after the three seeds had finished: their baseline's
# spread mixed two tokenizers (seed 1 trained on an earlier session's). Reported beside the test fixed
# before the final runs, never in its place.
ADDED_SEEDS = (4,)


@dataclass
class Run:
    dataset: str
    method: str
    seed: int
    final: bool = False  # the final runs: Inception at FINAL_INCEPTION_POINTS, and the guided setting

    @property
    def name(self) -> str:
        return f"{self.method}-s{self.seed}"

    @property
    def key(self) -> str:
        return f"{self.dataset}/{self.name}"

    @property
    def result_path(self) -> str:
        return os.path.join(RESULTS, self.dataset, f"{self.name}.json")

    @property
    def added(self) -> bool:
        """One of ``ADDED_SEEDS``' runs: reported beside the test fixed before the final runs, not in it."""
        return self.final and self.dataset == MAIN and self.seed in ADDED_SEEDS

    @property
    def inception_points(self) -> tuple[int, ...]:
        return FINAL_INCEPTION_POINTS if self.final else SCREEN_INCEPTION_POINTS

    def config(self, codes: str, out: str, steps: int = 1) -> RunConfig:
        """The run on ``codes`` into ``out`` for ``steps`` steps (``schedule`` gives the budget's)."""
        objective, teacher, data = (dict(part) for part in METHODS[self.method])
        share = objective.pop("ssl_compute_share", None)
        cfg = gpt_run_config(
            PRESET,
            codes,
            out,
            model=MODEL,
            model_args={},
            batch_size=IMAGES_PER_STEP,
            lr=LR,
            steps=steps,
            log_every=50,
            precision="fp32",
            seed=self.seed,
            objective=objective,
            teacher=teacher,
        )
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, **data))
        if share is not None:  # the self-supervised losses for ``share`` of the compute: a share of the steps
            ssl, plain = step_costs(cfg)
            until = share * plain / (share * plain + (1 - share) * ssl)
            cfg = dataclasses.replace(cfg, objective=dataclasses.replace(cfg.objective, ssl_until=until))
        return cfg


def step_costs(cfg: RunConfig) -> tuple[float, float]:
    """Analytic FLOPs of one step of ``cfg`` with and without the self-supervised losses (one process)."""
    from st_ar.models.gpt import GPTConfig
    from st_ar.train.flops import run_step_flops

    gpt = GPTConfig.from_name(cfg.model.name, **cfg.model.args)
    return run_step_flops(cfg, gpt, ssl=True), run_step_flops(cfg, gpt, ssl=False)


def flops_after(cfg: RunConfig, steps: int) -> float:
    """Analytic FLOPs of the first ``steps`` steps of ``cfg``."""
    ssl, plain = step_costs(cfg)
    switch = cfg.objective.ssl_steps(cfg.train.steps) if cfg.objective.needs_teacher else 0
    return ssl * min(steps, switch) + plain * max(0, steps - switch)


def schedule(run: Run, codes: str, out: str) -> tuple[RunConfig, list[int]]:
    """The run's configuration for the whole budget and the steps of its compute points: the baseline's
    BUDGET_STEPS steps of FLOPs, and the first step at which each eighth of it is spent."""
    baseline = Run(run.dataset, "baseline", run.seed).config(codes, out)
    budget = BUDGET_STEPS * step_costs(baseline)[1]
    cfg = run.config(codes, out)
    ssl, plain = step_costs(cfg)
    steps = round(budget / ssl)  # a first guess; ssl_until moves the switch with the run's length
    for _ in range(50):
        cfg = run.config(codes, out, steps)
        over = flops_after(cfg, steps) - budget
        if abs(over) < plain:
            break
        steps -= round(over / (ssl if over > 0 else plain)) or (1 if over < 0 else -1)
    points = []
    total = flops_after(cfg, steps)
    for k in range(1, POINTS + 1):
        lo, hi = 1, steps
        while lo < hi:  # the first step whose cumulative FLOPs reach k/POINTS of the run's total
            mid = (lo + hi) // 2
            if flops_after(cfg, mid) >= k / POINTS * total - 0.5 * plain:
                hi = mid
            else:
                lo = mid + 1
        points.append(lo)
    points[-1] = steps
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, export_steps=points))
    return cfg, points


def plan() -> list[Run]:
    """Every run, in the order the study takes them: the screen on the main set (one seed), then the final
    runs on new seeds: the main pair (the baseline and the best setting of the screen) on the main set and
    on the second, then a runner-up on the main set. The main pair comes first because it alone answers
    the question, on both sets; a runner-up only adds a second ST-AR setting. The final runs appear once
    the screen is complete and ``final_methods`` has chosen them."""
    runs = [Run(MAIN, method, SCREEN_SEED) for method in METHODS]
    chosen = final_methods()
    if chosen is None:
        return runs
    pair, others = chosen[:2], chosen[2:]
    runs += [Run(MAIN, method, seed, final=True) for seed in FINAL_SEEDS for method in pair]
    runs += [Run(SECOND, method, seed, final=True) for seed in SECOND_SEEDS for method in pair]
    runs += [Run(MAIN, method, seed, final=True) for seed in FINAL_SEEDS for method in others]
    runs += [Run(MAIN, method, seed, final=True) for seed in ADDED_SEEDS for method in pair]
    return runs


def screen_fids() -> dict[str, float] | None:
    """Each method's Inception FID at the last point of its screening run; None while one is unfinished."""
    fids = {}
    for method in METHODS:
        path = Run(MAIN, method, SCREEN_SEED).result_path
        if not os.path.exists(path):
            return None
        with open(path) as f:
            points = json.load(f)["points"]
        if len(points) < POINTS:
            return None
        fids[method] = points[-1]["unguided"]["fid"]
    return fids


def final_methods() -> tuple[str, ...] | None:
    """The final runs' methods, by the rule fixed before the screen ran: the baseline; the ST-AR method
    with the lowest Inception FID at the end of the screen; and the runner-up too if its FID is also
    below the screen baseline's. None until the screen is complete."""
    fids = screen_fids()
    if fids is None:
        return None
    star = sorted((fid, method) for method, fid in fids.items() if method != "baseline")
    chosen = ["baseline", star[0][1]]
    if len(star) > 1 and star[1][0] < fids["baseline"]:
        chosen.append(star[1][1])
    return tuple(chosen)
