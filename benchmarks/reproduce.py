"""The paper's ablation at small scale, on Fashion-MNIST and MNIST, resumable run by run.

    python benchmarks/reproduce.py --list               # every run, and which have a result file
    python benchmarks/reproduce.py --commit             # run what is missing; commit each result file
    python benchmarks/reproduce.py --only fashion-mnist/star-s0
    python benchmarks/reproduce.py --cost               # training and sampling cost, one process
    python benchmarks/reproduce.py --report             # docs/RESULTS.md and its figures from the results

Every run trains the same GPT (GPT-T: 4 blocks, width 128, over the 8x8 tokens of a VQ tokenizer trained here) for
the same steps on the same images per step, with seeds 0 and 1:

    baseline       LlamaGen: next-token loss only, one view per image
    mim            + masked-attention student aligned to the EMA teacher (two views per image)
    mim-step       + contrastive loss between steps of one view
    mim-view       + contrastive loss between the two views at one step
    star           all three (ST-AR)
    baseline-ec    the baseline trained for ST-AR's wall-clock time (equal compute): ST-AR sees two views
                   per image and runs a teacher, so "same steps" hides a cost difference

and on Fashion-MNIST, seeds 0 and 1, the mask-ratio sweep (0.15, 0.25, 0.35, 0.45), the
contrastive-layer sweep (1/4, 1/2, 3/4 and all of the depth), the teacher's EMA decay (cosine
schedules 0.9 -> 0.99, 0.99 -> 0.999, 0.999 -> 0.9999) and K, the steps contrasted per sequence
(2, 4, 8, 16); 0.25, 1/2, 0.99 -> 0.999 and 4 are the star run itself. Last, ST-AR with the two
changes that helped on this budget together: mask ratio 0.15 and the 0.9 -> 0.99 teacher.

Each finished run writes benchmarks/results/<dataset>/<run>.json (settings, cost, metrics, probe
curve) and, for seed 0, a 10x10 sample grid; those files are the state of the sweep. With --commit
each is committed as it appears, so a sweep stopped anywhere continues on any machine. Training
itself resumes from its checkpoint under --work (not committed). The tokenizer and codes of each
dataset are built once under --work, deterministically from the seed.

The equal-compute step count is fixed by a calibration (baseline and ST-AR steps alternated in one
process, so machine noise hits both alike) that is stored in results/<dataset>/calibration.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from st_ar.config import BASELINE, apply_overrides, preset  # noqa: E402
from st_ar.demo import DemoConfig, Evaluator, codes_model_args, extract, sample_run, train_tokenizer  # noqa: E402
from st_ar.models.gpt import GPT_PRESETS  # noqa: E402

RESULTS = os.path.join(ROOT, "benchmarks", "results")
DATASETS = ("fashion-mnist", "mnist")
SEEDS = (0, 1)

PRESET = "demo-mnist-star"  # every run's settings before the changes below
MODEL = "GPT-T"  # 4 blocks, width 128, no dropout: the demo-mnist-* presets
DEPTH = GPT_PRESETS[MODEL]["n_layer"]
STEPS = 800
IMAGES_PER_STEP = 32
LR = 2e-3

# the evaluation and the data, shared by every run of a dataset (DemoConfig fields; see st_ar/demo.py)
EVAL = dict(
    tokenizer_steps=300,
    train_images=10_000,
    test_images=2_000,
    per_class=50,  # 500 samples per run
    cfg_scale=1.0,  # the paper's ablation table is without guidance
    temperature=1.0,
    fid_samples=500,
    classifier_images=10_000,
    probe_train_images=5_000,
    probe_epochs=20,
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


# --------------------------------------------------------------------------------------------------
# Shared data per dataset
# --------------------------------------------------------------------------------------------------


def data_config(dataset: str) -> DemoConfig:
    return DemoConfig(dataset=dataset, seed=0, **EVAL)


def prepare_data(dataset: str, work: str) -> dict[str, str]:
    """Tokenizer and codes of ``dataset`` under work/<dataset> (built once; resumes if interrupted)."""
    cfg = data_config(dataset)
    base = os.path.join(work, dataset)
    tokenizer = os.path.join(base, "tokenizer", "tokenizer.pt")
    if not os.path.isfile(tokenizer):
        print(f"[{dataset}] training the tokenizer", flush=True)
        train_tokenizer(cfg, os.path.dirname(tokenizer))
    codes = {split: os.path.join(base, "codes", split) for split in ("train", "test")}
    for split, folder in codes.items():
        if _incomplete(folder):  # absent, or stopped part way
            print(f"[{dataset}] tokenizing the {split} images", flush=True)
            extract(cfg, tokenizer, folder, split)
    return {"tokenizer": tokenizer, **codes}


def _incomplete(folder: str) -> bool:
    from st_ar.data.codes import read_codes_meta

    try:
        read_codes_meta(folder)
        return False
    except (ValueError, FileNotFoundError):
        return True


# --------------------------------------------------------------------------------------------------
# One run
# --------------------------------------------------------------------------------------------------


def run_config(run: Run, codes: str, out: str, steps: int):
    from st_ar.data.codes import read_codes_meta

    meta = read_codes_meta(codes)
    base = preset(PRESET)
    objective = [f"objective.{k}={json.dumps(v) if isinstance(v, bool) else v}" for k, v in run.objective.items()]
    teacher = [f"teacher.{k}={v}" for k, v in run.teacher.items()]
    # the star preset with the baseline's objective builds no teacher or projector
    return apply_overrides(
        base,
        [
            f"model.name={MODEL}",
            f"model.args={json.dumps({**base.model.args, **codes_model_args(meta)})}",
            f"data.codes={codes}",
            f"optim.batch_size={IMAGES_PER_STEP}",
            f"optim.lr={LR}",
            "optim.scale_lr=false",
            f"train.steps={steps}",
            f"train.save_every={max(1, steps // 4)}",
            "train.log_every=20",
            "train.precision=fp32",
            f"train.seed={run.seed}",
            f"train.out_dir={out}",
            *objective,
            *teacher,
        ],
    )


def equal_compute_steps(dataset: str, data: dict[str, str], work: str) -> int:
    """Baseline steps costing as much time as STEPS ST-AR steps, from a stored calibration."""
    path = os.path.join(RESULTS, dataset, "calibration.json")
    if not os.path.isfile(path):
        print(f"[{dataset}] calibrating: baseline and ST-AR steps alternated in one process", flush=True)
        ratio = calibrate(data["train"], os.path.join(work, dataset, "calibration"))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            json.dump({"star_over_baseline_step_time": ratio, **machine()}, f, indent=2)
    with open(path) as f:
        ratio = json.load(f)["star_over_baseline_step_time"]
    return int(round(STEPS * ratio))


def calibrate(codes: str, work: str, steps: int = 12, rounds: int = 3) -> float:
    from st_ar.data.views import CodesDataset
    from st_ar.distributed import DistInfo
    from st_ar.train.loop import build_loader, build_state, train_step

    timings = {}
    states = {}
    for kind in ("baseline", "star"):
        run = Run("calibration", kind, 0, dict(VARIANTS[kind]))
        cfg = run_config(run, codes, os.path.join(work, kind), steps)
        state = build_state(cfg, DistInfo())
        dataset = CodesDataset(codes, cfg.objective.num_views, seed=0)
        loader, _ = build_loader(cfg, DistInfo(), dataset)
        states[kind] = (state, next(iter(loader)))
        train_step(state, [states[kind][1]], 0)  # warm-up
        timings[kind] = 0.0
    for r in range(rounds):
        for kind, (state, batch) in states.items():
            t0 = time.perf_counter()
            for i in range(steps):
                train_step(state, [batch], 1 + r * steps + i)
            timings[kind] += time.perf_counter() - t0
    return timings["star"] / timings["baseline"]


def machine() -> dict:
    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


_evaluators: dict[str, Evaluator] = {}


def execute(run: Run, work: str) -> dict:
    from st_ar.train.loop import train

    data = prepare_data(run.dataset, work)
    steps = equal_compute_steps(run.dataset, data, work) if run.equal_compute else run.steps
    out = os.path.join(work, run.dataset, "runs", run.name)
    cfg = run_config(run, data["train"], out, steps)
    print(f"[{run.key}] training {steps} steps", flush=True)
    t0 = time.perf_counter()
    summary = train(cfg)
    if not summary["finished"]:
        raise KeyboardInterrupt
    seconds = time.perf_counter() - t0
    speeds = [json.loads(line).get("speed/seqs_per_s") for line in open(os.path.join(out, "metrics.jsonl"))]
    speeds = [s for s in speeds if s]
    seqs_per_step = IMAGES_PER_STEP * cfg.objective.num_views
    dcfg = dataclasses.replace(data_config(run.dataset), seed=run.seed)
    print(f"[{run.key}] sampling and evaluating", flush=True)
    sampled = sample_run(dcfg, os.path.join(out, "model.pt"), data["tokenizer"], os.path.join(out, "samples"))
    if run.dataset not in _evaluators:  # the classifier, real-image features and probe codes, once
        _evaluators[run.dataset] = Evaluator(data_config(run.dataset), data["train"], data["test"])
    evaluator = _evaluators[run.dataset]
    metrics = evaluator(os.path.join(out, "model.pt"), os.path.join(out, "samples", "samples.npz"))
    result = {
        "run": run.key,
        "variant": run.name.rsplit("-s", 1)[0],
        "seed": run.seed,
        "objective": run.objective,
        "teacher": dataclasses.asdict(cfg.teacher),
        "steps": steps,
        "images_per_step": IMAGES_PER_STEP,
        "sequences_per_step": seqs_per_step,
        "gpt": {"model": MODEL, **GPT_PRESETS[MODEL]},
        "lr": LR,
        "train_seconds": round(seconds, 1),
        "s_per_step": float(np.median([seqs_per_step / s for s in speeds])) if speeds else seconds / steps,
        "final_losses": {k: v for k, v in summary["metrics"].items() if k.startswith("loss/")},
        "sampling": {**sampled, "cfg_scale": dcfg.cfg_scale, "temperature": dcfg.temperature},
        "metrics": metrics,
        "evaluation": evaluator.summary,
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    os.makedirs(os.path.dirname(run.result_path), exist_ok=True)
    if run.grid:
        import shutil

        shutil.copyfile(os.path.join(out, "samples", "grid.png"), run.result_path.replace(".json", ".png"))
    tmp = run.result_path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=2)
    os.replace(tmp, run.result_path)
    return result


def measure_cost() -> None:
    """Training step (time and peak memory, baseline vs ST-AR) and sampling speed, one after the other in
    one invocation on this machine; the printed tables go to results/cost.md."""
    here = os.path.dirname(os.path.abspath(__file__))
    step, sample = os.path.join(here, "train_step.py"), os.path.join(here, "sample_speed.py")
    commands = [  # the ablation's model at its 64 tokens, then LlamaGen-B at ImageNet's 256
        [sys.executable, step, "--models", MODEL, "--block-size", "64", "--sequences", "64", "--precisions", "fp32"],
        [sys.executable, step, "--models", "GPT-B", "--precisions", "fp32"],
        [sys.executable, sample, "--models", "GPT-B"],
    ]
    parts = [f"Measured {time.strftime('%Y-%m-%d %H:%M')} on {json.dumps(machine())}", ""]
    for cmd in commands:
        print("running", " ".join(os.path.basename(c) for c in cmd[1:]), flush=True)
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT).stdout
        print(out, flush=True)
        parts += [f"`python benchmarks/{' '.join(cmd[1:]).split('benchmarks/')[-1]}`", "", out.strip(), ""]
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "cost.md"), "w") as f:
        f.write("\n".join(parts))


def commit(paths: list[str], message: str, tries: int = 5) -> None:
    """Commit just these files (other work in the tree is left alone); retried while another git
    command holds the index lock."""
    paths = [p for p in paths if os.path.exists(p)]
    for attempt in range(tries):
        add = subprocess.run(["git", "-C", ROOT, "add", *paths], capture_output=True, text=True)
        done = add.returncode == 0 and (
            subprocess.run(
                ["git", "-C", ROOT, "commit", "-q", "-m", message, "--", *paths], capture_output=True, text=True
            ).returncode
            == 0
        )
        if done:
            return
        time.sleep(2 + 3 * attempt)
    print(f"warning: could not commit {paths}; commit them by hand", flush=True)


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default=os.path.join(ROOT, "runs", "reproduce"), help="checkpoints, codes, samples")
    p.add_argument("--only", action="append", default=[], help="run keys (dataset/name) or prefixes to run")
    p.add_argument("--list", action="store_true", help="list the runs and whether each has a result")
    p.add_argument("--commit", action="store_true", help="git-commit each result file as it is written")
    p.add_argument("--cost", action="store_true", help="measure training and sampling cost (results/cost.json)")
    p.add_argument("--report", action="store_true", help="write docs/RESULTS.md figures and tables")
    args = p.parse_args(argv)

    runs = [r for r in plan() if not args.only or any(r.key.startswith(o) for o in args.only)]
    if args.list:
        for r in runs:
            print(f"{'done ' if os.path.isfile(r.result_path) else 'todo '} {r.key}")
        return
    if args.cost:
        measure_cost()
        return
    if args.report:
        from results_report import write_results  # benchmarks/results_report.py

        write_results(plan())
        return
    todo = [r for r in runs if not os.path.isfile(r.result_path)]
    print(f"{len(runs) - len(todo)} of {len(runs)} runs have results; {len(todo)} to go", flush=True)
    for i, run in enumerate(todo, 1):
        t0 = time.perf_counter()
        result = execute(run, args.work)
        m = result["metrics"]
        print(
            f"[{i}/{len(todo)}] {run.key}: FID {m['fid']:.2f}, domain FID {m['domain_fid']:.2f}, class accuracy "
            f"{100 * m['class_accuracy']:.1f}%, probe at the last step "
            f"{100 * m['probe'][max(m['probe'], key=int)]:.1f}% ({time.perf_counter() - t0:.0f} s)",
            flush=True,
        )
        if args.commit:
            calibration = os.path.join(RESULTS, run.dataset, "calibration.json")
            commit(
                [run.result_path, run.result_path.replace(".json", ".png"), calibration],
                f"reproduce: result of {run.key}",
            )


if __name__ == "__main__":
    main()
