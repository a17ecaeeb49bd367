"""The end-to-end demo: tokenizer -> codes -> LlamaGen baseline and ST-AR -> samples -> metrics -> report.

    st-ar demo                               # MNIST on a 2-core CPU; runs/demo/mnist/report.md
    st-ar demo --size toy --out /tmp/toy     # a minute: the test suite's end-to-end check

Every stage writes its outputs under the run folder and a record in ``stages.json`` (its settings, how
long it took, what it measured). Running again skips each finished stage whose settings did not change,
resumes an interrupted training run from its checkpoint, and redoes a stage (and every stage after it)
whose settings did change.

Both models get the same budget: the same GPT, steps, learning rate and number of token sequences per
step. The baseline sees ``sequences_per_step`` images with one view each, ST-AR half as many images with
two views each (the paper's M = 2), so both fit the same number of next-token predictions per step;
ST-AR additionally pays for its teacher and projector, and the report gives both wall-clock times.

The stages themselves are st_ar/pipeline.py's (benchmarks/reproduce.py runs the same ones); this module
holds the demo's settings, the bookkeeping of stages.json and the report.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from . import pipeline
from .config import RunConfig, apply_overrides
from .runfolder import atomic_write, write_json_atomic

MODELS = ("baseline", "star")
TITLES = {"baseline": "LlamaGen baseline", "star": "ST-AR"}


@dataclass
class DemoConfig:
    dataset: str = "mnist"  # mnist or fashion-mnist (both offline)
    image_size: int = 32  # 28x28 digits are padded to 32, a multiple of the tokenizer's downsampling
    # ---- tokenizer ----
    vq_preset: str = "VQ-mnist"
    vq_args: dict[str, Any] = field(default_factory=dict)
    tokenizer_steps: int = 200
    tokenizer_eval_images: int = 1000
    # ---- codes ----
    train_images: int = 8_000  # a subset of the train split: each crop is seen about once
    test_images: int = 2_000
    crops: str = "five"  # corners and centre, no mirror images: a flipped digit is a different shape
    crop_range: float = 1.1
    # ---- the two GPTs ----
    model: str = "GPT-T"  # 4 blocks of width 128, no dropout (the demo-mnist-* presets)
    gpt_args: dict[str, Any] = field(default_factory=dict)  # GPTConfig fields on top of the preset
    steps: int = 1500
    sequences_per_step: int = 32  # baseline: 32 images x 1 view; ST-AR: 16 images x 2 views
    lr: float = 2e-3
    precision: str = "auto"
    overrides: list[str] = field(default_factory=list)  # extra section.field=value for both runs
    # ---- sampling ----
    per_class: int = 50
    cfg_scale: float = 3.0  # guidance: clearly class-conditional digits after a short run
    temperature: float = 0.8  # a little sharper than 1.0: cleaner digits, at some cost in diversity
    sample_batch: int = 250
    # ---- evaluation ----
    classifier_images: int = 10_000
    classifier_epochs: int = 2
    fid_samples: int = 250  # Inception FID: per model, against as many real test images
    probe_train_images: int = 5_000
    probe_epochs: int = 20
    seed: int = 0


SIZES: dict[str, dict[str, Any]] = {
    "full": {},
    # seconds on a CPU: every stage runs, nothing is meaningful; the suite's end-to-end check
    "toy": dict(
        image_size=8,
        vq_preset="VQ-debug",
        tokenizer_steps=4,
        tokenizer_eval_images=32,
        train_images=64,
        test_images=32,
        gpt_args=dict(n_layer=2, n_head=4, dim=64),  # smaller than GPT-T
        steps=4,
        sequences_per_step=8,
        lr=1e-3,
        per_class=2,
        sample_batch=20,
        classifier_images=200,
        classifier_epochs=1,
        fid_samples=8,
        probe_train_images=64,
        probe_epochs=2,
    ),
}


def demo_config(size: str = "full", **changes: Any) -> DemoConfig:
    if size not in SIZES:
        raise ValueError(f"unknown demo size {size!r}; sizes: {', '.join(SIZES)}")
    return DemoConfig(**{**SIZES[size], **changes})


# --------------------------------------------------------------------------------------------------
# Stage bookkeeping
# --------------------------------------------------------------------------------------------------


def _fingerprint(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


class Stages:
    """Runs named stages in order; a stage is skipped when its record in stages.json carries the same
    key (its settings chained with the keys of all stages before it) and its outputs still exist."""

    def __init__(self, out: str, total: int):
        self.out, self.total, self.index = out, total, 0
        self.path = os.path.join(out, "stages.json")
        self.records: dict[str, dict] = {}
        if os.path.isfile(self.path):
            with open(self.path) as f:
                self.records = json.load(f)
        self.chain = ""
        self.start = time.perf_counter()

    def run(self, name: str, settings: dict, outputs: list[str], fn: Callable[[], dict], title: str) -> dict:
        self.index += 1
        self.chain = _fingerprint([self.chain, name, settings])
        record = self.records.get(name)
        paths = [os.path.join(self.out, p) for p in outputs]
        header = f"[{self.index}/{self.total}] {title}"
        if record and record.get("key") == self.chain and all(os.path.exists(p) for p in paths):
            print(f"{header}: already done ({record['seconds']:.0f} s when it ran)", flush=True)
            return record["result"]
        if record and record.get("key") != self.chain:  # settings changed: start this stage over
            for p in paths:
                if os.path.isdir(p):
                    shutil.rmtree(p)
                elif os.path.exists(p):
                    os.remove(p)
        print(f"{header} ...", flush=True)
        t0 = time.perf_counter()
        result = fn()
        seconds = time.perf_counter() - t0
        self.records[name] = {"key": self.chain, "seconds": round(seconds, 1), "result": result}
        write_json_atomic(self.path, self.records)
        elapsed = time.perf_counter() - self.start
        print(f"{header}: done in {_mmss(seconds)} (demo so far {_mmss(elapsed)})", flush=True)
        return result


def _mmss(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m}m{s:02d}s"


# --------------------------------------------------------------------------------------------------
# The stages
# --------------------------------------------------------------------------------------------------


def train_tokenizer(cfg: DemoConfig, out: str) -> dict:
    return pipeline.train_tokenizer(
        out,
        dataset=cfg.dataset,
        image_size=cfg.image_size,
        vq_preset=cfg.vq_preset,
        vq_args=cfg.vq_args,
        steps=cfg.tokenizer_steps,
        eval_images=cfg.tokenizer_eval_images,
        seed=cfg.seed,
    )


def extract(cfg: DemoConfig, tokenizer: str, out: str, split: str) -> dict:
    limit = cfg.train_images if split == "train" else cfg.test_images
    return pipeline.extract_split(
        tokenizer,
        out,
        split,
        dataset=cfg.dataset,
        image_size=cfg.image_size,
        limit=limit,
        crops=cfg.crops,
        crop_range=cfg.crop_range,
    )


def run_config(cfg: DemoConfig, kind: str, codes: str, out: str) -> RunConfig:
    """The demo-mnist-* preset of ``kind`` with the demo's settings, then ``cfg.overrides``."""
    views = 1 if kind == "baseline" else 2
    if cfg.sequences_per_step % views:
        raise ValueError(f"sequences_per_step must be even (ST-AR takes 2 views), got {cfg.sequences_per_step}")
    run = pipeline.gpt_run_config(
        "demo-mnist-star" if kind == "star" else "demo-mnist-baseline",
        codes,
        out,
        model=cfg.model,
        model_args=cfg.gpt_args,
        batch_size=cfg.sequences_per_step // views,
        lr=cfg.lr,
        steps=cfg.steps,
        log_every=max(1, min(20, cfg.steps // 10)),
        precision=cfg.precision,
        seed=cfg.seed,
    )
    return apply_overrides(run, list(cfg.overrides))


def train_gpt(cfg: DemoConfig, kind: str, codes: str, out: str) -> dict:
    summary, seconds = pipeline.train_gpt(run_config(cfg, kind, codes, out))
    losses = {k.split("/")[-1]: v for k, v in summary["metrics"].items() if k.startswith("loss/")}
    return {
        "steps": summary["step"],
        "seconds": round(seconds, 1),
        "s_per_step": seconds / cfg.steps,
        "tflop": summary["flops"] / 1e12,  # analytic training compute (train/flops.py)
        "loss": losses,
    }


def sample_models(cfg: DemoConfig, runs: dict[str, str], tokenizer: str, out: str) -> dict:
    """``cfg.per_class`` samples of every class of each model into out/KIND (row c of grid.png: class c);
    every model gets the same seed."""
    return {
        kind: pipeline.sample_model(
            os.path.join(run, "model.pt"),
            tokenizer,
            os.path.join(out, kind),
            per_class=cfg.per_class,
            batch_size=cfg.sample_batch,
            cfg_scale=cfg.cfg_scale,
            temperature=cfg.temperature,
            seed=cfg.seed,
            desc=f"sampling {kind}",
        )
        for kind, run in runs.items()
    }


def evaluate(cfg: DemoConfig, samples: str, codes: dict[str, str], runs: dict[str, str], out: str) -> dict:
    from .eval.probe import plot_probe

    evaluator = pipeline.Evaluator(
        codes["train"],
        codes["test"],
        dataset=cfg.dataset,
        test_images=cfg.test_images,
        classifier_images=cfg.classifier_images,
        classifier_epochs=cfg.classifier_epochs,
        fid_samples=cfg.fid_samples,
        probe_train_images=cfg.probe_train_images,
        probe_epochs=cfg.probe_epochs,
        seed=cfg.seed,
    )
    result = dict(evaluator.summary, models={})
    for kind, run in runs.items():
        npz = os.path.join(samples, kind, "samples.npz")
        result["models"][kind] = evaluator(os.path.join(run, "model.pt"), npz)
    os.makedirs(out, exist_ok=True)
    curves = {TITLES[k]: {int(s): a for s, a in m["probe"].items()} for k, m in result["models"].items()}
    plot_probe(curves, os.path.join(out, "probe.png"), title=f"linear probe on {cfg.dataset}, middle layer")
    write_json_atomic(os.path.join(out, "metrics.json"), result)
    return result


# --------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------


def _read_losses(run: str) -> tuple[list[int], list[float]]:
    steps, losses = [], []
    path = os.path.join(run, "metrics.jsonl")
    if os.path.isfile(path):
        with open(path) as f:
            for line in f:
                row = json.loads(line)
                if "loss/ar" in row:
                    steps.append(row["step"])
                    losses.append(row["loss/ar"])
    return steps, losses


def write_figures(out: str, runs: dict[str, str], samples: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    fig, axes = plt.subplots(1, len(runs), figsize=(5 * len(runs), 5.4))
    for ax, kind in zip(np.atleast_1d(axes), runs):
        ax.imshow(Image.open(os.path.join(samples, kind, "grid.png")))
        ax.set_title(f"{TITLES[kind]} (one class per row)")
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "samples.png"), dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for kind, run in runs.items():
        ax.plot(*_read_losses(run), label=TITLES[kind])
    ax.set_xlabel("step")
    ax.set_ylabel("next-token loss (train batch)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out, "loss.png"), dpi=120)
    plt.close(fig)


def write_report(cfg: DemoConfig, out: str, records: dict[str, dict]) -> str:
    tok = records["tokenizer"]["result"]
    evals = records["evaluate"]["result"]
    sampled = records["sample"]["result"]
    total = sum(r["seconds"] for r in records.values())
    psnr, usage = tok.get("psnr", float("nan")), 100 * tok.get("codebook_usage", 0)
    lines = [
        f"# ST-AR demo on {cfg.dataset}",
        "",
        f"Everything below was produced by `st-ar demo` in {_mmss(total)} of compute (sum of the stages; "
        f"{torch.get_num_threads()} threads, {'CUDA' if torch.cuda.is_available() else 'CPU'}).",
        "",
        "## Setup",
        "",
        f"- Tokenizer: {cfg.vq_preset}, {cfg.tokenizer_steps} steps; held-out PSNR {psnr:.2f} dB, "
        f"codebook usage {usage:.1f}% on {tok.get('images')} test images.",
        f"- Codes: {cfg.train_images} training images x {cfg.crops} crops, "
        f"{cfg.test_images} test images (centre crop).",
        f"- GPT: {cfg.model}{' ' + json.dumps(cfg.gpt_args) if cfg.gpt_args else ''}, {cfg.steps} steps, lr {cfg.lr}, "
        f"{cfg.sequences_per_step} token sequences per step for both "
        "(baseline: one view per image; ST-AR: two views of half as many images).",
        f"- Sampling: {cfg.per_class} per class, CFG {cfg.cfg_scale}, temperature {cfg.temperature}, seed {cfg.seed} "
        "for both models.",
        "",
        "## Results",
        "",
        "| | train time | s/step | AR loss (last) | class accuracy | domain FID | Inception FID | "
        "probe, last step | probe, best step |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for kind in MODELS:
        tr, ev = records[f"train_{kind}"]["result"], evals["models"][kind]
        probe = {int(s): a for s, a in ev["probe"].items()}
        best = max(probe, key=probe.get)
        last = max(probe)
        ar_loss = tr["loss"].get("ar", float("nan"))
        lines.append(
            f"| {TITLES[kind]} | {_mmss(tr['seconds'])} | {tr['s_per_step']:.2f} | {ar_loss:.3f} "
            f"| {100 * ev['class_accuracy']:.1f}% | {ev['domain_fid']:.2f} | {ev['fid']:.1f} "
            f"| {100 * probe[last]:.1f}% (step {last}) | {100 * probe[best]:.1f}% (step {best}) |"
        )
    lines += [
        "",
        f"Class accuracy: the share of samples that a small CNN trained on real {cfg.dataset} images "
        f"({100 * evals['classifier_test_accuracy']:.1f}% on real test images) assigns to the class they were "
        f"sampled for. Domain FID: Frechet distance in that CNN's 128-d features against {cfg.test_images} real "
        f"test images. Inception FID: {evals['fid_reference_images']} samples against as many real test images "
        "(small samples bias FID upwards; compare the two models, not with published numbers). Probe: linear "
        f"probe on layer {evals['models']['star']['probe_layer']} features at 8 steps, null class as the condition, "
        f"trained on {cfg.probe_train_images} training images and tested on {cfg.test_images} test images.",
        "",
        "![samples](samples.png)",
        "",
        "![probe](eval/probe.png) ![loss](loss.png)",
        "",
        "## Cost",
        "",
        "| stage | seconds |",
        "|---|---|",
    ]
    lines += [f"| {name} | {r['seconds']:.0f} |" for name, r in records.items()]
    trained = {kind: records[f"train_{kind}"]["result"] for kind in MODELS}
    if all("tflop" in tr for tr in trained.values()):  # stages recorded before the count have none
        base = trained["baseline"]["tflop"]
        lines += [
            "",
            "Training compute (analytic FLOPs, docs/training.md): "
            + ", ".join(
                f"{TITLES[k]} {tr['tflop']:.1f} TFLOP ({tr['tflop'] / base:.2f}x the baseline's; "
                f"{1e3 * tr['tflop'] / tr['seconds']:.0f} GFLOP/s)"
                for k, tr in trained.items()
            )
            + ".",
        ]
    lines += [
        "",
        "Sampling speed (KV cache, batch "
        f"{cfg.sample_batch}): "
        + ", ".join(f"{TITLES[k]} {v['tokens_per_s']:.0f} tokens/s" for k, v in sampled.items())
        + ".",
        "",
        "Run folders: `tokenizer/`, `codes/` and `codes_test/`, `baseline/` and `star/` (checkpoints, metrics.jsonl, "
        "TensorBoard), "
        "`samples/` (samples.npz per model), `eval/` (metrics.json, probe.png).",
        "",
    ]
    path = os.path.join(out, "report.md")
    atomic_write(path, lambda f: f.write("\n".join(lines)), binary=False)
    return path


# --------------------------------------------------------------------------------------------------
# The whole demo
# --------------------------------------------------------------------------------------------------


def run_demo(cfg: DemoConfig, out: str) -> dict:
    """Run (or finish) every stage in ``out``; returns the stage records (also in out/stages.json)."""
    os.makedirs(out, exist_ok=True)
    settings = dataclasses.asdict(cfg)
    stages = Stages(out, total=8)
    tokenizer = os.path.join(out, "tokenizer", "tokenizer.pt")
    # the layout the demo-mnist-* presets and the README's step-by-step commands use
    codes = {"train": os.path.join(out, "codes"), "test": os.path.join(out, "codes_test")}
    runs = {kind: os.path.join(out, kind) for kind in MODELS}
    samples, evals = os.path.join(out, "samples"), os.path.join(out, "eval")

    pick = lambda *names: {n: settings[n] for n in names}  # the settings one stage depends on
    stages.run(
        "tokenizer",
        pick("dataset", "image_size", "vq_preset", "vq_args", "tokenizer_steps", "tokenizer_eval_images", "seed"),
        ["tokenizer"],
        lambda: train_tokenizer(cfg, os.path.join(out, "tokenizer")),
        f"train the {cfg.vq_preset} tokenizer on {cfg.dataset} ({cfg.tokenizer_steps} steps)",
    )
    stages.run(
        "codes",
        pick("train_images", "test_images", "crops", "crop_range"),
        ["codes", "codes_test"],
        lambda: {split: extract(cfg, tokenizer, codes[split], split) for split in ("train", "test")},
        f"tokenize {cfg.train_images} training images x {cfg.crops} crops and {cfg.test_images} test images",
    )
    gpt_settings = pick("model", "gpt_args", "steps", "sequences_per_step", "lr", "precision", "overrides", "seed")
    for kind in MODELS:
        stages.run(
            f"train_{kind}",
            gpt_settings,
            [kind],
            lambda kind=kind: train_gpt(cfg, kind, codes["train"], runs[kind]),
            f"train the {TITLES[kind]} GPT ({cfg.steps} steps)",
        )
    stages.run(
        "sample",
        pick("per_class", "cfg_scale", "temperature", "seed"),
        ["samples"],
        lambda: sample_models(cfg, runs, tokenizer, samples),
        f"sample {cfg.per_class} images per class from each model",
    )
    stages.run(
        "evaluate",
        pick("classifier_images", "classifier_epochs", "fid_samples", "probe_train_images", "probe_epochs"),
        ["eval"],
        lambda: evaluate(cfg, samples, codes, runs, evals),
        "evaluate: class accuracy, domain FID, Inception FID, linear probe",
    )
    stages.run("figures", {}, ["samples.png", "loss.png"], lambda: write_figures(out, runs, samples) or {}, "figures")
    stages.run("report", {}, ["report.md"], lambda: {"path": write_report(cfg, out, stages.records)}, "report")
    return stages.records
