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

The runs and their settings are defined in benchmarks/ablation.py; the stages (tokenizer, codes,
training, sampling, evaluation) are st_ar/pipeline.py's, the ones `st-ar demo` runs. This script runs
the plan and keeps its result files.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import subprocess
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import ablation  # noqa: E402
from ablation import (  # noqa: E402  (benchmarks/ablation.py: the runs and their settings)
    CODES,
    EVALUATION,
    IMAGES_PER_STEP,
    LR,
    MODEL,
    ROOT,
    SAMPLING,
    STEPS,
    TOKENIZER,
    VARIANTS,
    Run,
    calibration_path,
    plan,
)

from st_ar import pipeline  # noqa: E402
from st_ar.models.gpt import GPT_PRESETS  # noqa: E402
from st_ar.runfolder import atomic_write, write_json_atomic  # noqa: E402

# --------------------------------------------------------------------------------------------------
# Shared data per dataset
# --------------------------------------------------------------------------------------------------


def prepare_data(dataset: str, work: str, codes_settings: dict = CODES, codes_name: str = "codes") -> dict[str, str]:
    """Tokenizer and codes of ``dataset`` under work/<dataset> (built once; resumes if interrupted): the
    TOKENIZER, then the codes of ``codes_settings`` (default the ablation's) in work/<dataset>/<codes_name>."""
    base = os.path.join(work, dataset)
    tokenizer = os.path.join(base, "tokenizer", "tokenizer.pt")
    if not os.path.isfile(tokenizer):
        print(f"[{dataset}] training the tokenizer", flush=True)
        pipeline.train_tokenizer(os.path.dirname(tokenizer), dataset=dataset, **TOKENIZER)
    codes = {split: os.path.join(base, codes_name, split) for split in ("train", "test")}
    for split, folder in codes.items():
        if not pipeline.codes_finished(folder):  # absent, or stopped part way
            print(f"[{dataset}] tokenizing the {split} images", flush=True)
            limit = codes_settings["train_images"] if split == "train" else codes_settings["test_images"]
            settings = {k: codes_settings[k] for k in ("image_size", "crops", "crop_range")}
            pipeline.extract_split(tokenizer, folder, split, dataset=dataset, limit=limit, **settings)
    return {"tokenizer": tokenizer, **codes}


def evaluator(dataset: str, data: dict[str, str], evaluation: dict = EVALUATION) -> pipeline.Evaluator:
    """The classifier, real-image features and probe codes of ``dataset`` under the settings ``evaluation``
    (the ablation's by default), prepared once per process."""
    key = (dataset, data["train"], data["test"], tuple(sorted(evaluation.items())))
    if key not in _evaluators:
        _evaluators[key] = pipeline.Evaluator(data["train"], data["test"], dataset=dataset, **evaluation)
    return _evaluators[key]


_evaluators: dict[tuple, pipeline.Evaluator] = {}


# --------------------------------------------------------------------------------------------------
# One run
# --------------------------------------------------------------------------------------------------


def equal_compute_steps(dataset: str, data: dict[str, str], work: str) -> int:
    """Baseline steps costing as much time as STEPS ST-AR steps, from a stored calibration."""
    path = calibration_path(dataset)
    if not os.path.isfile(path):
        print(f"[{dataset}] calibrating: baseline and ST-AR steps alternated in one process", flush=True)
        ratio = calibrate(data["train"], os.path.join(work, dataset, "calibration"))
        write_json_atomic(path, {"star_over_baseline_step_time": ratio, **machine()})
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
        cfg = run.config(codes, os.path.join(work, kind), steps)
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


def execute(run: Run, work: str) -> dict:
    data = prepare_data(run.dataset, work)
    steps = equal_compute_steps(run.dataset, data, work) if run.equal_compute else run.steps
    out = os.path.join(work, run.dataset, "runs", run.name)
    cfg = run.config(data["train"], out, steps)
    print(f"[{run.key}] training {steps} steps", flush=True)
    summary, seconds = pipeline.train_gpt(cfg)
    speeds = [json.loads(line).get("speed/seqs_per_s") for line in open(os.path.join(out, "metrics.jsonl"))]
    speeds = [s for s in speeds if s]
    seqs_per_step = IMAGES_PER_STEP * cfg.objective.num_views
    print(f"[{run.key}] sampling and evaluating", flush=True)
    samples = os.path.join(out, "samples")
    model = os.path.join(out, "model.pt")
    sampled = pipeline.sample_model(model, data["tokenizer"], samples, seed=run.seed, **SAMPLING)
    evaluate = evaluator(run.dataset, data)
    metrics = evaluate(model, os.path.join(samples, "samples.npz"))
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
        # the run's own count, across resumes: analytic FLOPs and the seconds of its training steps alone
        "compute": {"flops": summary["flops"], "train_seconds": round(summary["train_seconds"], 1)},
        "s_per_step": float(np.median([seqs_per_step / s for s in speeds])) if speeds else seconds / steps,
        "final_losses": {k: v for k, v in summary["metrics"].items() if k.startswith("loss/")},
        "sampling": {**sampled, "cfg_scale": SAMPLING["cfg_scale"], "temperature": SAMPLING["temperature"]},
        "metrics": metrics,
        "evaluation": evaluate.summary,
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    if run.grid:
        os.makedirs(os.path.dirname(run.result_path), exist_ok=True)
        shutil.copyfile(os.path.join(samples, "grid.png"), run.result_path.replace(".json", ".png"))
    write_json_atomic(run.result_path, result)
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
    atomic_write(os.path.join(ablation.RESULTS, "cost.md"), lambda f: f.write("\n".join(parts)), binary=False)


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
            calibration = calibration_path(run.dataset)
            commit(
                [run.result_path, run.result_path.replace(".json", ".png"), calibration],
                f"reproduce: result of {run.key}",
            )


if __name__ == "__main__":
    main()
