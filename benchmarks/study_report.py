"""The compute section of docs/RESULTS.md from the compute study's result files (benchmarks/study.py).

Everything between the ``<!-- compute:start -->`` and ``<!-- compute:end -->`` markers is rewritten (the
discussion around them is written by hand), with two figures: docs/results/compute-fid.png (Inception
and domain FID against training compute) and docs/results/compute-probe.png (the probe at step 8 and at
the last step against compute). Every method is one line; where a method has several seeds the line is
their mean and the band their range.
"""

from __future__ import annotations

import os

import numpy as np
import study
from results_report import load, replace_between  # benchmarks/results_report.py: the ablation's report

DOC = os.path.join(study.ROOT, "docs", "RESULTS.md")
FIGURES = os.path.join(study.ROOT, "docs", "results")
START, END = "<!-- compute:start -->", "<!-- compute:end -->"


def metric(point: dict, name: str) -> float | None:
    """One number of a point: fid, domain_fid, class_accuracy (unguided), probe8 / probe_last, or guided_*."""
    if name.startswith("probe"):
        probe = {int(k): v for k, v in point["probe"].items() if k != "layer"}
        return probe[8] if name == "probe8" else probe[max(probe)]
    if name.startswith("guided_"):
        return point.get("guided", {}).get(name[len("guided_") :])
    return point["unguided"].get(name)


def method_runs(results: dict[str, dict], dataset: str, method: str, final_only: bool = False) -> list[dict]:
    return [
        r
        for k, r in sorted(results.items())
        if k.startswith(f"{dataset}/") and r["method"] == method and (r["final"] or not final_only)
    ]


def curve_runs(results: dict[str, dict], dataset: str, method: str) -> list[dict]:
    """The finished runs a method's curves and speed-up come from: its final runs once one has finished,
    else its screening run. The screen's seed chose the final methods, so pooling it with their final
    seeds would favour them."""
    done = [r for r in method_runs(results, dataset, method) if len(r["points"]) == study.POINTS]
    return [r for r in done if r["final"]] or done


def mean_curve(runs: list[dict], name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Compute, mean, min and max over the runs, at the points every run has measured."""
    curves = [dict(zip(*(a.tolist() for a in _point_curve(r, name)))) for r in runs]
    common = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
    x = np.array([np.mean([_flops_at(r, k) for r in runs]) for k in common])
    v = np.array([[c[k] for k in common] for c in curves]) if common else np.zeros((0, 0))
    if not common:
        return x, x, x, x
    return x, v.mean(0), v.min(0), v.max(0)


def _point_curve(result: dict, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(point numbers, values) of the points that have ``name``."""
    pairs = [(p["point"], metric(p, name)) for p in result["points"]]
    pairs = [(k, v) for k, v in pairs if v is not None]
    return np.array([k for k, _ in pairs]), np.array([v for _, v in pairs])


def _flops_at(result: dict, k: int) -> float:
    return next(p["flops"] for p in result["points"] if p["point"] == k)


def reach(x: np.ndarray, y: np.ndarray, target: float) -> float | None:
    """The first compute at which a falling curve reaches ``target`` (linear between points), or None."""
    for i in range(len(x)):
        if y[i] <= target:
            if i == 0:
                return float(x[0])
            frac = (y[i - 1] - target) / (y[i - 1] - y[i])
            return float(x[i - 1] + frac * (x[i] - x[i - 1]))
    return None


def _fmt(values: list[float], fmt: str, scale: float = 1.0) -> str:
    values = [v * scale for v in values if v is not None]
    if not values:
        return "-"
    if len(values) == 1:
        return format(values[0], fmt)
    return f"{format(float(np.mean(values)), fmt)} ± {format(float(np.std(values, ddof=1)), fmt)}"


def _last(result: dict, name: str) -> float | None:
    return metric(result["points"][-1], name) if len(result["points"]) == study.POINTS else None


def _at_point(result: dict, name: str, k: int) -> float | None:
    at = [p for p in result["points"] if p["point"] == k]
    return metric(at[0], name) if at else None


def _at_half(result: dict, name: str) -> float | None:
    return _at_point(result, name, study.POINTS // 2)


def screen_table(results: dict[str, dict], dataset: str) -> list[str]:
    base = method_runs(results, dataset, "baseline")
    base_cost = base[0]["budget_flops"] / base[0]["steps"] if base else None
    lines = [
        "| method | steps | FLOPs per image vs baseline | s per step | FID (half / all) | domain FID (half / all) "
        "| class acc. | probe step 8 | probe last step | points |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for method in study.METHODS:
        runs = [r for r in method_runs(results, dataset, method) if r["seed"] == study.SCREEN_SEED]
        if not runs:
            lines.append(f"| {method} | not run yet | | | | | | | | 0/{study.POINTS} |")
            continue
        r = runs[0]
        done = r["points"][-1]
        cost = f"{r['budget_flops'] / r['steps'] / base_cost:.2f}" if base_cost else "-"
        seconds = done["train_seconds"] / done["step"]
        lines.append(
            f"| {method} | {r['steps']} | {cost} | {seconds:.3f} "
            f"| {_fmt([_at_half(r, 'fid')], '.1f')} / {_fmt([_last(r, 'fid')], '.1f')} "
            f"| {_fmt([_at_half(r, 'domain_fid')], '.1f')} / {_fmt([_last(r, 'domain_fid')], '.1f')} "
            f"| {_fmt([_last(r, 'class_accuracy')], '.1f', 100)}% | {_fmt([_last(r, 'probe8')], '.1f', 100)}% "
            f"| {_fmt([_last(r, 'probe_last')], '.1f', 100)}% | {len(r['points'])}/{study.POINTS} |"
        )
    return lines


def planned_finals(dataset: str) -> tuple[str, ...] | None:
    """The final methods the plan runs on ``dataset`` (the second set runs the main pair only)."""
    chosen = study.final_methods()
    if chosen is None:
        return None
    return tuple(m for m in chosen if any(r.final and r.dataset == dataset and r.method == m for r in study.plan()))


def final_groups(results: dict[str, dict], dataset: str, method: str) -> list[tuple[str, list[dict]]]:
    """A final method's finished runs as (label, runs): the seeds fixed before the final runs, then, once
    an added seed has finished, every seed (``study.ADDED_SEEDS``)."""
    runs = [r for r in method_runs(results, dataset, method, final_only=True) if len(r["points"]) == study.POINTS]
    fixed = [r for r in runs if not r.get("added")]
    added = [r for r in runs if r.get("added")]
    groups = [(method, fixed)]
    if added:
        groups.append((f"{method}, seed {', '.join(str(r['seed']) for r in added)} added", fixed + added))
    return groups


def final_table(results: dict[str, dict], dataset: str) -> list[str]:
    chosen = planned_finals(dataset)
    if chosen is None:
        return ["Not chosen yet: the rule above picks the final runs' methods once the screen is complete."]
    lines = [
        "| method | seeds | FID | domain FID | class acc. | probe step 8 | probe last step | guided FID "
        "| guided class acc. |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for method in chosen:
        for label, runs in final_groups(results, dataset, method):
            if not runs:
                lines.append(f"| {label} | none finished yet | | | | | | | |")
                continue
            cells = [
                _fmt([_last(r, "fid") for r in runs], ".1f"),
                _fmt([_last(r, "domain_fid") for r in runs], ".1f"),
                _fmt([_last(r, "class_accuracy") for r in runs], ".1f", 100) + "%",
                _fmt([_last(r, "probe8") for r in runs], ".1f", 100) + "%",
                _fmt([_last(r, "probe_last") for r in runs], ".1f", 100) + "%",
                _fmt([_last(r, "guided_fid") for r in runs], ".1f"),
                _fmt([_last(r, "guided_class_accuracy") for r in runs], ".1f", 100) + "%",
            ]
            lines.append(f"| {label} | {', '.join(str(r['seed']) for r in runs)} | " + " | ".join(cells) + " |")
    return lines


def welch_interval(a: list[float], b: list[float], level: float = 0.95) -> tuple[float, float, float]:
    """mean(a) - mean(b) and its ``level`` confidence interval by Welch's t (unequal variances)."""
    from scipy import stats

    a_, b_ = np.asarray(a, float), np.asarray(b, float)
    va, vb = a_.var(ddof=1) / len(a_), b_.var(ddof=1) / len(b_)
    diff = float(a_.mean() - b_.mean())
    se = float(np.sqrt(va + vb))
    if se == 0:
        return diff, diff, diff
    dof = (va + vb) ** 2 / (va**2 / (len(a_) - 1) + vb**2 / (len(b_) - 1))
    half = float(stats.t.ppf(0.5 + level / 2, dof)) * se
    return diff, diff - half, diff + half


# the figures compared with the baseline's, and the sign that favours the method
DIFFERENCES = (
    ("fid", "FID", -1),
    ("domain_fid", "domain FID", -1),
    ("class_accuracy", "class acc.", 1),
    ("probe_last", "probe last step", 1),
)


def difference_table(results: dict[str, dict], dataset: str) -> list[str]:
    """Each final ST-AR method against the final baselines at the end of the budget: the difference of the
    means and its 95% interval over seeds (Welch). Fixed before any final ST-AR run finished: a difference
    counts as beyond the seed spread when its interval excludes zero."""
    chosen = planned_finals(dataset) or ()
    groups = {m: final_groups(results, dataset, m) for m in chosen}
    lines = [
        "| method | seeds (baseline's) | " + " | ".join(f"{label} − baseline" for _, label, _ in DIFFERENCES) + " |",
        "|---|---|" + "---|" * len(DIFFERENCES),
    ]
    # the fixed seeds against the baseline's fixed seeds; with an added seed, every seed against every seed
    base_groups = groups.get("baseline", [("baseline", [])])
    base_fixed, base_every = base_groups[0][1], base_groups[-1][1]
    for method in chosen:
        if method == "baseline":
            continue
        for i, (label, runs) in enumerate(groups[method]):
            base = base_fixed if i == 0 else base_every
            seeds = f"{', '.join(str(r['seed']) for r in runs) or 'none'} ({', '.join(str(r['seed']) for r in base)})"
            if len(runs) < 2 or len(base) < 2:
                lines.append(
                    f"| {label} | {seeds} | " + " | ".join(["needs two seeds of each"] * len(DIFFERENCES)) + " |"
                )
                continue
            cells = []
            for name, _, better in DIFFERENCES:
                scale = 100 if name in ("class_accuracy", "probe_last") else 1
                diff, lo, hi = (
                    scale * v for v in welch_interval([_last(r, name) for r in runs], [_last(r, name) for r in base])
                )
                verdict = "" if lo <= 0 <= hi else (" (better)" if diff * better > 0 else " (worse)")
                cells.append(f"{diff:+.1f} [{lo:+.1f}, {hi:+.1f}]{verdict}")
            lines.append(f"| {label} | {seeds} | " + " | ".join(cells) + " |")
    return lines


def same_tokenizer_table(results: dict[str, dict], dataset: str) -> list[str]:
    """The final ST-AR methods against the final baselines that trained on the tokenizer every final ST-AR
    run shares (each result records ``tokenizer_sha256``). Empty when every baseline shares it already, or
    when the ST-AR runs do not share one. Beside the test above, not in its place."""
    chosen = planned_finals(dataset) or ()
    finished = {
        m: [r for r in method_runs(results, dataset, m, final_only=True) if len(r["points"]) == study.POINTS]
        for m in chosen
    }
    star = [r for m, runs in finished.items() if m != "baseline" for r in runs]
    tokenizers = {r.get("tokenizer_sha256") for r in star}
    every_base = finished.get("baseline", [])
    if len(tokenizers) != 1 or None in tokenizers:
        return []
    (tokenizer,) = tokenizers
    base = [r for r in every_base if r.get("tokenizer_sha256") == tokenizer]
    if len(base) == len(every_base) or len(base) < 2:
        return []
    later = 3 * study.POINTS // 4
    lines = [
        f"On the one tokenizer every final ST-AR run trained on ({tokenizer[:8]}): the baseline's seeds "
        f"{', '.join(str(r['seed']) for r in base)}, FID {_fmt([_last(r, 'fid') for r in base], '.1f')} at the end "
        f"(difference and 95% interval as above; FID at {later}/{study.POINTS} of the budget as well):",
        "",
        f"| method | seeds | FID | FID − baseline | FID at {later}/{study.POINTS} − baseline | guided FID − baseline "
        "| probe last step − baseline | reaches the baseline's final FID at |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def difference(runs: list[dict], value, scale: float = 1.0) -> str:
        diff, lo, hi = (scale * v for v in welch_interval([value(r) for r in runs], [value(r) for r in base]))
        return f"{diff:+.1f} [{lo:+.1f}, {hi:+.1f}]"

    target = float(np.mean([_last(r, "fid") for r in base]))
    for method, runs in finished.items():
        if method == "baseline" or len(runs) < 2:
            continue
        x, y, _, _ = mean_curve(runs, "fid")
        hit = reach(x, y, target) if len(x) else None
        cells = [
            _fmt([_last(r, "fid") for r in runs], ".1f"),
            difference(runs, lambda r: _last(r, "fid")),
            difference(runs, lambda r: _at_point(r, "fid", later)),
            difference(runs, lambda r: _last(r, "guided_fid")),
            difference(runs, lambda r: _last(r, "probe_last"), 100),
            f"{hit / runs[0]['budget_flops']:.2f}x the budget" if hit is not None else "not within the budget",
        ]
        lines.append(f"| {method} | {', '.join(str(r['seed']) for r in runs)} | " + " | ".join(cells) + " |")
    return lines


def speedup_table(results: dict[str, dict], dataset: str) -> list[str]:
    """The compute each method needs to reach the baseline's final FID, as a fraction of the budget."""
    base = curve_runs(results, dataset, "baseline")
    if not base:
        return ["(no finished baseline yet)"]
    lines = [
        "| method | seeds | reaches the baseline's final FID at | reaches its final domain FID at |",
        "|---|---|---|---|",
    ]
    for method in study.METHODS:
        runs = curve_runs(results, dataset, method)
        if not runs:
            continue
        cells = []
        for name in ("fid", "domain_fid"):
            target = float(np.mean([_last(r, name) for r in base]))
            x, y, _, _ = mean_curve(runs, name)
            hit = reach(x, y, target) if len(x) else None
            budget = runs[0]["budget_flops"]
            cells.append(f"{hit / budget:.2f}x the budget" if hit is not None else "not within the budget")
        lines.append(f"| {method} | {', '.join(str(r['seed']) for r in runs)} | " + " | ".join(cells) + " |")
    return lines


def flatness(results: dict[str, dict], dataset: str) -> list[str]:
    """How much the baseline's FIDs still fell over the last quarter of its budget (the criterion: < 2%)."""
    lines = []
    for r in method_runs(results, dataset, "baseline"):
        if len(r["points"]) < study.POINTS:
            continue
        parts = []
        for name, label in (("fid", "FID"), ("domain_fid", "domain FID")):
            k, v = _point_curve(r, name)
            q = dict(zip(k.tolist(), v.tolist()))
            start = 3 * study.POINTS // 4
            if start in q and study.POINTS in q:
                change = (q[study.POINTS] - q[start]) / q[start]  # + : it rose, - : it still fell
                parts.append(f"{label} {q[start]:.1f} -> {q[study.POINTS]:.1f} ({100 * change:+.1f}%)")
        if parts:
            lines.append(f"- {r['run']}: over the last quarter, " + "; ".join(parts))
    return lines


def figure(results: dict[str, dict], dataset: str, names: list[tuple[str, str]], path: str, scale: float = 1.0) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(names), figsize=(6 * len(names), 4.2))
    legend = {}  # method -> line: one legend for both panels, a colour per method in every figure
    for ax, (name, label) in zip(np.atleast_1d(axes), names):
        for i, method in enumerate(study.METHODS):
            runs = curve_runs(results, dataset, method)
            x, mean, lo, hi = mean_curve(runs, name)
            if not len(x):
                continue
            which = "final" if runs[0]["final"] else "screen"
            seeds = ", ".join(str(r["seed"]) for r in runs)
            legend[method] = ax.plot(
                x / 1e15, mean * scale, marker="o", ms=3, color=f"C{i}", label=f"{method} ({which}, seed {seeds})"
            )[0]
            if len(runs) > 1:
                ax.fill_between(x / 1e15, lo * scale, hi * scale, color=f"C{i}", alpha=0.2)
        ax.set_xlabel("training compute (PFLOP, analytic)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    drawn = bool(legend)
    if drawn:
        np.atleast_1d(axes)[0].legend(handles=[legend[m] for m in study.METHODS if m in legend], fontsize=7)
        fig.suptitle(f"{dataset}: every method at equal compute (finished runs; line: mean over seeds, band: range)")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
    plt.close(fig)
    return drawn


def write_report(runs) -> None:
    results = load(runs)
    os.makedirs(FIGURES, exist_ok=True)
    parts = [START, ""]
    for dataset in (study.MAIN, study.SECOND):
        if not any(k.startswith(f"{dataset}/") for k in results):
            continue
        fid_png, probe_png = (os.path.join(FIGURES, f"compute-{kind}-{dataset}.png") for kind in ("fid", "probe"))
        parts += [f"### {dataset}", ""]
        if dataset == study.MAIN:
            parts += [
                f"Screen (seed {study.SCREEN_SEED}, every method at the baseline's {study.BUDGET_STEPS} steps "
                "of compute):",
                "",
                *screen_table(results, dataset),
                "",
            ]
        parts += [
            "Final runs at equal compute (mean ± standard deviation over seeds):",
            "",
            *final_table(results, dataset),
            "",
        ]
        parts += [
            "Each final ST-AR method minus the final baseline at the end of the budget: difference of the means "
            'and its 95% interval over seeds (Welch\'s t; percentage points for the accuracies). "better" or '
            '"worse" marks a difference whose interval excludes zero, the study\'s test of "beyond the seed '
            'spread", fixed before any final ST-AR run finished:',
            "",
            *difference_table(results, dataset),
            "",
        ]
        if same := same_tokenizer_table(results, dataset):
            parts += [*same, ""]
        parts += [
            "Compute needed to reach the baseline's final figure (mean curve over a method's finished final runs, "
            "or over its screening run while none has finished):",
            "",
            *speedup_table(results, dataset),
            "",
        ]
        parts += [*flatness(results, dataset), ""]
        if figure(results, dataset, [("fid", "Inception FID"), ("domain_fid", "domain FID")], fid_png):
            parts += [f"![FID against compute](results/{os.path.basename(fid_png)})", ""]
        names = [("probe8", "probe accuracy at step 8 (%)"), ("probe_last", "probe accuracy at the last step (%)")]
        if figure(results, dataset, names, probe_png, scale=100):
            parts += [f"![probe against compute](results/{os.path.basename(probe_png)})", ""]
    parts.append(END)
    replace_between(DOC, START, END, parts)
    print(f"wrote {DOC} ({len(results)} results)")
