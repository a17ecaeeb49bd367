"""Does ST-AR pay for its compute? Every method trained for the same analytic FLOPs on all 60 000 images
and measured at every eighth of the budget, resumable point by point.

    python benchmarks/compute_study.py --list               # every run, its steps and points done
    python benchmarks/compute_study.py --commit             # run what is missing; commit each point's result
    python benchmarks/compute_study.py --only fashion-mnist/baseline-s0
    python benchmarks/compute_study.py --report             # the compute section of docs/RESULTS.md

The runs, budgets and protocol are defined in benchmarks/study.py. Each run writes
benchmarks/results/compute/<dataset>/<run>.json, rewritten (and with --commit committed) after every
compute point, so a study stopped anywhere keeps every point measured so far: a point whose exported
weights are gone is trained again from the run's checkpoint, or from the start. Training again from the
start is bit-identical on the same machine and work folder, but not after the work folder (tokenizer,
codes) is rebuilt or on another machine: a run whose run folder is gone before it finished is therefore
measured again from point 1, its earlier points kept in the result under "superseded".
Checkpoints, codes and samples live under --work (not committed). The Inception statistics of the test
images are committed (benchmarks/results/compute/reference/) the first time they are computed, so a
rebuilt work folder does not compute them again.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import study  # noqa: E402  (benchmarks/study.py: the runs and their settings)
from reproduce import commit, evaluator, machine, prepare_data  # noqa: E402

from st_ar import pipeline  # noqa: E402
from st_ar.data.codes import read_codes_meta  # noqa: E402
from st_ar.runfolder import write_json_atomic  # noqa: E402

# --------------------------------------------------------------------------------------------------
# One run, point by point
# --------------------------------------------------------------------------------------------------


def data_of(dataset: str, work: str) -> dict[str, str]:
    return prepare_data(dataset, work, study.CODES[dataset], study.CODES_NAME)


def load_result(run: study.Run) -> dict | None:
    if not os.path.isfile(run.result_path):
        return None
    with open(run.result_path) as f:
        return json.load(f)


def train_to(cfg, step: int, out: str) -> dict:
    """Train (resuming) until ``step`` and return its compute: cumulative FLOPs and training seconds. A
    checkpoint already past ``step`` whose export is gone is trained again from the start."""
    from st_ar.models.loading import read_checkpoint
    from st_ar.train.loop import checkpoint_path, export_folder
    from st_ar.train.loop import train as train_run

    folder = export_folder(cfg, step)
    record = os.path.join(folder, "compute.json")
    model = os.path.join(folder, "model.pt")
    if os.path.isfile(record) and os.path.isfile(model):
        with open(record) as f:
            return json.load(f)
    exported = read_checkpoint(model) if os.path.isfile(model) else None
    if exported is not None and "compute" in exported:  # the export carries its compute: nothing to train
        summary = {"step": step, **exported["compute"]}
    else:
        ckpt = checkpoint_path(cfg)
        saved = read_checkpoint(ckpt) if os.path.isfile(ckpt) else None
        if saved is not None and saved["step"] == step and exported is not None:  # exported before compute was kept
            summary = {"step": step, **saved["compute"]}
        else:
            if saved is not None and saved["step"] >= step:
                print(f"  the checkpoint is at or past step {step}, its export is gone: training again from the start")
                shutil.rmtree(out)
            summary = train_run(cfg, stop_at=step)
            if summary["step"] != step:
                raise KeyboardInterrupt  # Ctrl-C: the checkpoint is saved, the next call resumes
    compute = {"step": step, "flops": summary["flops"], "train_seconds": round(summary["train_seconds"], 1)}
    write_json_atomic(record, compute)
    return compute


def study_evaluator(dataset: str, data: dict[str, str]) -> pipeline.Evaluator:
    """The study's evaluator. The Inception statistics of the test images come from the committed file
    (study.reference_path) when it exists; otherwise they are computed, and written there."""
    from st_ar.eval.fid import save_statistics

    committed = study.reference_path(dataset)
    if os.path.isfile(committed):
        return evaluator(dataset, data, {**study.EVALUATION, "fid_reference": committed})
    evaluate = evaluator(dataset, data, study.EVALUATION)
    mu, sigma = evaluate.ref_stats
    source = f"{dataset}, test split, all {evaluate.summary['real_test_images']} images"
    save_statistics(committed, {"mu": mu, "sigma": sigma}, evaluate.inception, source=source)
    return evaluate


def measure_point(run: study.Run, k: int, model: str, tokenizer: str, evaluate: pipeline.Evaluator) -> dict:
    """Every metric of the weights ``model`` at point ``k`` (1-based) of ``run``."""
    folder = os.path.dirname(model)
    seed = 1000 * run.seed + k  # a fresh sampling seed at every point, the same for every method
    t0 = time.perf_counter()
    pipeline.sample_model(
        model,
        tokenizer,
        os.path.join(folder, "samples"),
        cfg_scale=1.0,
        seed=seed,
        desc=f"sampling, point {k}",
        **study.SAMPLING,
    )
    unguided = evaluate.samples(os.path.join(folder, "samples", "samples.npz"), k in run.inception_points)
    probe = evaluate.probe(model)
    point = {"unguided": unguided, "probe": {"layer": probe["layer"], **probe["accuracy"]}}
    if run.final and k == study.POINTS:
        guided = os.path.join(folder, "samples-guided")
        pipeline.sample_model(
            model, tokenizer, guided, cfg_scale=study.GUIDED_CFG, seed=seed, desc="sampling, guided", **study.SAMPLING
        )
        point["guided"] = {"cfg_scale": study.GUIDED_CFG, **evaluate.samples(os.path.join(guided, "samples.npz"), True)}
    point["eval_seconds"] = round(time.perf_counter() - t0, 1)
    return point


def supersede_lost_training(result: dict, out: str, key: str) -> None:
    """An unfinished result whose run folder ``out`` is gone starts again from point 1: the training its
    points measured is lost, and one trained again from the seed is not bit-identical after the work
    folder is rebuilt. The old points stay in the result, under "superseded"."""
    done = len(result["points"])
    if done == 0 or done == len(result["point_steps"]) or os.path.isdir(out):
        return
    print(f"[{key}] the training of points 1-{done} is gone: measuring from point 1 again", flush=True)
    why = f"points 1-{done} of a training whose run folder was lost before the run finished"
    result.setdefault("superseded", []).append({"why": why, "points": result["points"]})
    result["points"] = []


def execute(run: study.Run, work: str, on_point=None) -> dict:
    """Train and measure ``run`` at every point it has no result for; the result after each point is
    written (and handed to ``on_point``)."""
    data = data_of(run.dataset, work)
    out = os.path.join(work, run.dataset, "study", run.name)
    cfg, points = study.schedule(run, data["train"], out)
    result = load_result(run) or {
        "run": run.key,
        "method": run.method,
        "seed": run.seed,
        "final": run.final,
        "added": run.added,
        "settings": {k: v for k, v in zip(("objective", "teacher", "data"), study.METHODS[run.method])},
        "steps": cfg.train.steps,
        "point_steps": points,
        "images_per_step": study.IMAGES_PER_STEP,
        "ssl_until": cfg.objective.ssl_until,
        "budget_flops": study.flops_after(cfg, cfg.train.steps),
        "points": [],
    }
    if result["point_steps"] != points:
        raise SystemExit(
            f"{run.result_path} was measured on other steps {result['point_steps']} than {points}; "
            "the budget changed: move the old result away"
        )
    supersede_lost_training(result, out, run.key)
    evaluate = None
    for k, step in enumerate(points, 1):
        if len(result["points"]) >= k:
            continue
        print(f"[{run.key}] point {k}/{len(points)}: training to step {step} of {cfg.train.steps}", flush=True)
        compute = train_to(cfg, step, out)
        evaluate = evaluate or study_evaluator(run.dataset, data)
        from st_ar.train.loop import export_folder

        point = {
            "point": k,
            **compute,
            **measure_point(run, k, os.path.join(export_folder(cfg, step), "model.pt"), data["tokenizer"], evaluate),
        }
        result["points"].append(point)
        # which tokenizer the training saw: a rebuilt work folder trains another, so runs can differ by it
        tokenizer = read_codes_meta(data["train"])["tokenizer_sha256"]
        date = time.strftime("%Y-%m-%d %H:%M")
        result.update(evaluation=evaluate.summary, tokenizer_sha256=tokenizer, machine=machine(), date=date)
        write_json_atomic(run.result_path, result)
        u = point["unguided"]
        fid = f", FID {u['fid']:.2f}" if "fid" in u else ""
        print(
            f"[{run.key}] point {k}: domain FID {u['domain_fid']:.2f}{fid}, class accuracy "
            f"{100 * u['class_accuracy']:.1f}%, probe at step 8 {100 * point['probe']['8']:.1f}% "
            f"({point['eval_seconds']:.0f} s to measure)",
            flush=True,
        )
        if on_point:
            on_point(run, k)
    return result


def is_done(run: study.Run) -> bool:
    result = load_result(run)
    return result is not None and len(result["points"]) == study.POINTS


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default=os.path.join(study.ROOT, "runs", "compute"), help="checkpoints, codes, samples")
    p.add_argument("--only", action="append", default=[], help="run keys (dataset/name) or prefixes to run")
    p.add_argument("--list", action="store_true", help="list the runs and the points each has measured")
    p.add_argument("--commit", action="store_true", help="git-commit each result file as it is rewritten")
    p.add_argument("--report", action="store_true", help="write the compute section of docs/RESULTS.md")
    args = p.parse_args(argv)

    def selected() -> list[study.Run]:  # planned again after every run: the screen's end adds the finals
        return [r for r in study.plan() if not args.only or any(r.key.startswith(o) for o in args.only)]

    runs = selected()
    if args.list:
        for r in runs:
            result = load_result(r)
            print(f"{len(result['points']) if result else 0}/{study.POINTS}  {r.key}")
        return
    if args.report:
        from study_report import write_report  # benchmarks/study_report.py

        write_report(study.plan())
        return

    def on_point(run: study.Run, k: int) -> None:
        if args.commit:
            # the reference statistics go in with the first point measured after they were computed
            paths = [run.result_path, study.reference_path(run.dataset)]
            commit(paths, f"compute study: {run.key}, point {k}/{study.POINTS}")

    chosen = study.final_methods()
    while True:
        todo = [r for r in runs if not is_done(r)]
        print(f"{len(runs) - len(todo)} of {len(runs)} runs are measured; {len(todo)} to go", flush=True)
        if not todo:
            break
        execute(todo[0], args.work, on_point)
        runs = selected()
        if chosen is None and (chosen := study.final_methods()) is not None:
            print(f"the screen is complete; the final runs, by the rule: {', '.join(chosen)}", flush=True)
    if chosen is None:
        print("the final runs wait for the screen: they are chosen from its last points", flush=True)


if __name__ == "__main__":
    main()
