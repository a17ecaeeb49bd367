"""Tables and figures of docs/RESULTS.md from the result files of benchmarks/reproduce.py.

    python benchmarks/results_report.py          # or: python benchmarks/reproduce.py --report

Rewrites only the part of docs/RESULTS.md between the ``<!-- results:start -->`` and
``<!-- results:end -->`` markers (the discussion around them is written by hand), and the figures
under docs/results/. Runs without a result file yet are listed as missing, so the report can be
made at any point of the sweep.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from ablation import (  # noqa: E402  (benchmarks/ablation.py: the runs and their settings)
    CONTRASTED_STEPS,
    DATASETS,
    DEPTH,
    LAYER_QUARTERS,
    MASK_RATIOS,
    PRESET,
    ROOT,
    SEEDS,
    plan,
)

from st_ar.config import preset  # noqa: E402
from st_ar.runfolder import atomic_write  # noqa: E402

DOC = os.path.join(ROOT, "docs", "RESULTS.md")
FIGURES = os.path.join(ROOT, "docs", "results")
START, END = "<!-- results:start -->", "<!-- results:end -->"

ROWS = [
    ("baseline", "LlamaGen baseline"),
    ("mim", "+ MIM"),
    ("mim-step", "+ MIM + step"),
    ("mim-view", "+ MIM + view"),
    ("star", "ST-AR (all three)"),
    ("baseline-ec", "baseline, equal compute"),
]


def load(runs) -> dict[str, dict]:
    out = {}
    for run in runs:
        if os.path.isfile(run.result_path):
            with open(run.result_path) as f:
                out[run.key] = json.load(f)
    return out


def _mean_std(values: list[float], fmt: str, scale: float = 1.0) -> str:
    if not values:
        return "-"
    v = np.asarray(values) * scale
    if len(v) == 1:
        return f"{v[0]:{fmt}}"
    return f"{v.mean():{fmt}} ± {v.std(ddof=1):{fmt}}"


def _probe(result: dict) -> dict[int, float]:
    return {int(s): a for s, a in result["metrics"]["probe"].items()}


def variant_table(results: dict[str, dict], dataset: str, seeds) -> list[str]:
    lines = [
        "| run | seeds | steps | s/step | FID | domain FID | class accuracy | probe, last step | probe, best step |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for variant, title in ROWS:
        rs = [results[k] for k in (f"{dataset}/{variant}-s{s}" for s in seeds) if k in results]
        if not rs:
            lines.append(f"| {title} | (not run yet) | | | | | | | |")
            continue
        last = [_probe(r)[max(_probe(r))] for r in rs]
        best = [max(_probe(r).values()) for r in rs]
        m = [r["metrics"] for r in rs]
        lines.append(
            f"| {title} | {len(rs)} | {rs[0]['steps']} | {_mean_std([r['s_per_step'] for r in rs], '.3f')} "
            f"| {_mean_std([x['fid'] for x in m], '.2f')} | {_mean_std([x['domain_fid'] for x in m], '.2f')} "
            f"| {_mean_std([x['class_accuracy'] for x in m], '.1f', 100)}% "
            f"| {_mean_std(last, '.1f', 100)}% | {_mean_std(best, '.1f', 100)}% |"
        )
    return lines


def sweep_table(results: dict[str, dict], dataset: str, rows: list[tuple[str, list[str]]], label: str) -> list[str]:
    """One row per setting: mean ± spread over the runs (seeds) that have results."""
    lines = [
        f"| {label} | seeds | FID | domain FID | class accuracy | probe, last step | probe, best step |",
        "|---|---|---|---|---|---|---|",
    ]
    for value, names in rows:
        rs = [results[k] for k in (f"{dataset}/{n}" for n in names) if k in results]
        if not rs:
            lines.append(f"| {value} | (not run yet) | | | | | |")
            continue
        m = [r["metrics"] for r in rs]
        last = [_probe(r)[max(_probe(r))] for r in rs]
        best = [max(_probe(r).values()) for r in rs]
        lines.append(
            f"| {value} | {len(rs)} | {_mean_std([x['fid'] for x in m], '.2f')} "
            f"| {_mean_std([x['domain_fid'] for x in m], '.2f')} "
            f"| {_mean_std([x['class_accuracy'] for x in m], '.1f', 100)}% "
            f"| {_mean_std(last, '.1f', 100)}% | {_mean_std(best, '.1f', 100)}% |"
        )
    return lines


def probe_figure(results: dict[str, dict], dataset: str, seeds, path: str) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    drawn = False
    for variant, title in ROWS:
        rs = [results[k] for k in (f"{dataset}/{variant}-s{s}" for s in seeds) if k in results]
        if not rs or variant in ("mim", "mim-step", "mim-view"):
            continue
        steps = sorted(_probe(rs[0]))
        acc = np.array([[100 * _probe(r)[s] for s in steps] for r in rs])
        ax.errorbar(steps, acc.mean(0), yerr=acc.std(0) if len(rs) > 1 else None, marker="o", capsize=3, label=title)
        drawn = True
    if not drawn:
        plt.close(fig)
        return False
    ax.set_xlabel("step (image tokens consumed)")
    ax.set_ylabel("linear probe top-1 (%)")
    ax.set_title(f"{dataset}: middle-layer probe, mean over seeds")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def grids_figure(dataset: str, path: str) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    shown = [(v, t) for v, t in ROWS if os.path.isfile(_grid(dataset, v))]
    shown = [(v, t) for v, t in shown if v in ("baseline", "star", "baseline-ec")]
    if not shown:
        return False
    fig, axes = plt.subplots(1, len(shown), figsize=(4.2 * len(shown), 4.6))
    for ax, (variant, title) in zip(np.atleast_1d(axes), shown):
        ax.imshow(Image.open(_grid(dataset, variant)))
        ax.set_title(f"{title}, seed 0")
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    Image.open(path).convert("L").save(path, optimize=True)  # grey images: a third of the RGB file in git
    return True


def _grid(dataset: str, variant: str) -> str:
    return os.path.join(ROOT, "benchmarks", "results", dataset, f"{variant}-s0.png")


def write_results(runs) -> None:
    results = load(runs)
    os.makedirs(FIGURES, exist_ok=True)
    body = [START, "", f"{len(results)} of {len(runs)} runs have results.", ""]
    for dataset in DATASETS:
        body += [f"### {dataset}", ""]
        body += variant_table(results, dataset, SEEDS) + [""]
        probe_png = os.path.join(FIGURES, f"probe_{dataset}.png")
        if probe_figure(results, dataset, SEEDS, probe_png):
            body += [f"![probe curves, {dataset}](results/probe_{dataset}.png)", ""]
        grids_png = os.path.join(FIGURES, f"samples_{dataset}.png")
        if grids_figure(dataset, grids_png):
            body += [f"![samples, {dataset}](results/samples_{dataset}.png)", ""]

    def seeds(name: str) -> list[str]:  # the runs of one setting, e.g. mask0.15-s0, mask0.15-s1
        return [f"{name}-s{s}" for s in SEEDS]

    def sweep_rows(runs: dict, star_value, label=str) -> list[tuple[str, list[str]]]:
        """The rows of one sweep, by value: ``runs`` maps each value to its run name; the star run has star_value."""
        runs = {**runs, star_value: "star"}
        return [(label(v), seeds(runs[v])) for v in sorted(runs)]

    star = preset(PRESET).objective  # each sweep changes one setting of the star run
    body += ["### Mask ratio (fashion-mnist, ST-AR)", ""]
    masks = sweep_rows({r: f"mask{r}" for r in MASK_RATIOS}, star.mask_ratio)
    body += sweep_table(results, "fashion-mnist", masks, "mask ratio") + [""]
    body += ["### Contrastive layer (fashion-mnist, ST-AR)", ""]
    layers = sweep_rows(
        {DEPTH * q // 4: f"layer{q}of4" for q in LAYER_QUARTERS}, DEPTH // 2, lambda v: f"{v} of {DEPTH}"
    )
    body += sweep_table(results, "fashion-mnist", layers, "layer") + [""]
    body += ["### Teacher EMA decay, cosine schedule (fashion-mnist, ST-AR)", ""]
    emas = [("0.9 → 0.99", seeds("ema-fast")), ("0.99 → 0.999", seeds("star"))]
    emas += [("0.999 → 0.9999", seeds("ema-slow"))]
    body += sweep_table(results, "fashion-mnist", emas, "EMA decay") + [""]
    body += ["### Steps contrasted per sequence, K (fashion-mnist, ST-AR)", ""]
    ks = sweep_rows({k: f"k{k}" for k in CONTRASTED_STEPS}, star.num_steps)
    body += sweep_table(results, "fashion-mnist", ks, "K") + [""]
    body += ["### Both changes that helped: mask ratio 0.15 and the 0.9 → 0.99 teacher (fashion-mnist)", ""]
    combined = [("LlamaGen baseline", seeds("baseline")), ("ST-AR, paper settings", seeds("star"))]
    combined += [("ST-AR, mask 0.15", seeds("mask0.15")), ("ST-AR, teacher 0.9 → 0.99", seeds("ema-fast"))]
    combined += [("ST-AR, both", seeds("mask0.15-ema-fast")), ("baseline, equal compute", seeds("baseline-ec"))]
    body += sweep_table(results, "fashion-mnist", combined, "run") + ["", END]

    replace_between(DOC, START, END, body)
    print(f"wrote {DOC} ({len(results)} results)")


def replace_between(doc: str, start: str, end: str, lines: list[str]) -> None:
    """Rewrite the part of ``doc`` from marker ``start`` to marker ``end`` with ``lines`` (which hold both
    markers); the hand-written text around them stays."""
    text = open(doc).read() if os.path.isfile(doc) else f"# Results\n\n{start}\n{end}\n"
    if start not in text or end not in text:
        raise ValueError(f"{doc} lacks the {start} / {end} markers")
    head, rest = text.split(start, 1)
    tail = rest.split(end, 1)[1]
    atomic_write(doc, lambda f: f.write(head + "\n".join(lines) + tail), binary=False)


if __name__ == "__main__":
    write_results(plan())
