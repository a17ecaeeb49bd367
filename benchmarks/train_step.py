"""Training-step cost: LlamaGen baseline vs ST-AR and every loss combination, per sequence and per image.

Every case runs the library's real ``train_step`` (random weights and random codes: the cost does
not depend on their values) on the same number of sequences:

  baseline  S images x 1 view  : AR loss, no teacher
  ST-AR     S/2 images x 2 views: masked student + AR + MIM + step + view, EMA teacher forward

The paper trains on images, and each image brings ``num_views`` = 2 sequences to an ST-AR step, so
the cost of an epoch is the cost per image: about twice the per-sequence ratio. Both are printed.

    python benchmarks/train_step.py                          # GPT-S and GPT-B, fp32 and bf16, baseline vs ST-AR
    python benchmarks/train_step.py --models GPT-B --sequences 4 --precisions fp32
    python benchmarks/train_step.py --models GPT-B --variants all   # every objective variant, cost per image
    python benchmarks/train_step.py --models GPT-B --variants open  # the variants the paper leaves open
    python benchmarks/train_step.py --set train.compile=true --json out.json
    python benchmarks/train_step.py --models GPT-B --sequences 4 --precisions fp32 --compare-compile

Variants (``--variants``, comma-separated, or ``paper`` / ``all`` / ``open``): baseline; ar2 (AR alone on two
views: what the second view costs); mim, step, view, mim+step, mim+view, step+view; star (all three). ``paper``
is the paper's ablation: baseline, mim, mim+step, mim+view, star. ``open`` is baseline, star and the variants
the paper leaves open (docs/training.md): star-1view (objective.student_views=1: the student on one view, the
teacher on both), star-share0.5 (objective.masked_share=0.5), star-after-ssl (a step past
objective.ssl_until: plain next-token on both views, no teacher). data.same_orientation_views changes which
crops are drawn, not the cost, so it has no row.

The fp32 and bf16 matmul peaks of this device are measured at the start of the run (square matmuls), and
model FLOPs utilisation is printed against the peak of each row's precision. FLOPs are analytic
(st_ar/train/flops.py ``step_flops``, the count every training run logs): 6 x matmul parameters x tokens for
the student's forward and backward, 2 x for the teacher's forward (no output head), the attention score and
value products, and the projector.

Peak memory is measured per case in a fresh subprocess (the peak resident set of a process that builds
that case and runs two steps; on a GPU the peak allocated memory), so one case's allocations cannot hide
another's. Two cases alternate step by step so the machine's noise hits both alike; with more than two,
each is measured in turn and the baseline again at the end (the drift between its two measurements is
printed: read ratios against it).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # this checkout's st_ar, not another one installed in the environment
    sys.path.insert(0, REPO)

from st_ar.config import BASELINE, apply_overrides, preset  # noqa: E402
from st_ar.distributed import DistInfo  # noqa: E402
from st_ar.objectives.total import ObjectiveConfig  # noqa: E402
from st_ar.train.flops import step_flops  # noqa: E402
from st_ar.train.loop import build_state, train_step  # noqa: E402

# name -> ObjectiveConfig fields; every on/off combination of the three losses that ObjectiveConfig accepts
VARIANTS = {
    "baseline": dict(BASELINE),
    "ar2": dict(mim=False, step=False, view=False, num_views=2),
    "mim": dict(mim=True, step=False, view=False),
    "step": dict(mim=False, step=True, view=False),
    "view": dict(mim=False, step=False, view=True),
    "mim+step": dict(mim=True, step=True, view=False),
    "mim+view": dict(mim=True, step=False, view=True),
    "step+view": dict(mim=False, step=True, view=True),
    "star": dict(mim=True, step=True, view=True),
}
# the variants the paper leaves open (docs/training.md): ST-AR with one ObjectiveConfig field changed
OPEN_VARIANTS = {
    "star-1view": dict(student_views=1),  # student on view 1 only; the teacher still runs both views
    "star-share0.5": dict(masked_share=0.5),  # half the sequences masked: costs what star costs
    "star-after-ssl": dict(ssl_until=0.5),  # a step past objective.ssl_until: plain next-token on 2 views
}
VARIANTS.update({name: dict(VARIANTS["star"], **fields) for name, fields in OPEN_VARIANTS.items()})
VARIANT_SETS = {
    "paper": ["baseline", "mim", "mim+step", "mim+view", "star"],
    "all": [name for name in VARIANTS if name not in OPEN_VARIANTS],  # every loss combination
    "open": ["baseline", "star", *OPEN_VARIANTS],
}
# the step a variant is timed at, of a run of STEPS_OF_RUN steps: past the switch for ssl_until=0.5
STEPS_OF_RUN = 2
TIMED_AT = {"star-after-ssl": 1}
PRECISION_DTYPE = {"fp32": torch.float32, "bf16": torch.bfloat16}


def parse_variants(spec: str) -> list[str]:
    names: list[str] = []
    for item in spec.split(","):
        for name in VARIANT_SETS.get(item, [item]):
            if name not in VARIANTS:
                raise SystemExit(f"unknown variant {name!r}; known: {', '.join(VARIANTS)}, {', '.join(VARIANT_SETS)}")
            if name not in names:
                names.append(name)
    return names


# ----------------------------------------------------------------------------- matmul peak and FLOPs


def matmul_peak(dtype: torch.dtype, device: torch.device, n: int | None = None, repeats: int = 3) -> float:
    """Best FLOP/s of square n x n matmuls in ``dtype`` on ``device``, measured now.

    Through ``F.linear``, the call every nn.Linear of the model makes: on a CPU a plain bf16 ``a @ b``
    takes a path about 10x slower than the oneDNN kernel that linear (and autocast) use.
    """
    n = n or (8192 if device.type == "cuda" else 512)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    iters = 20 if device.type == "cuda" else 2
    best = float("inf")
    for i in range(repeats + 1):  # the first round warms up (kernel choice, clocks, caches)
        sync(device)
        start = time.perf_counter()
        for _ in range(iters):
            F.linear(a, b)
        sync(device)
        if i:
            best = min(best, (time.perf_counter() - start) / iters)
    return 2 * n**3 / best


def rate(flops_per_s: float) -> str:
    return f"{flops_per_s / 1e12:.1f} TFLOP/s" if flops_per_s >= 1e12 else f"{flops_per_s / 1e9:.1f} GFLOP/s"


# ----------------------------------------------------------------------------- one case


def make_state(
    model: str,
    variant: str,
    sequences: int,
    precision: str,
    device: torch.device,
    block_size: int,
    overrides: list[str] = (),
    objective: dict | None = None,
):
    """The state and batch of one case; ``objective``: ObjectiveConfig fields changed from the variant's."""
    fields = {**VARIANTS[variant], **(objective or {})}
    views = fields.get("num_views", 2)
    if sequences % views:
        raise SystemExit(f"--sequences {sequences} is not a multiple of {views} views ({variant})")
    cfg = preset("debug")
    cfg = apply_overrides(
        cfg,
        [
            f"model.name={model}",
            f'model.args={{"block_size": {block_size}}}',
            f"train.precision={precision}",
            f"optim.batch_size={sequences // views}",
            f"train.steps={STEPS_OF_RUN}",
            *overrides,
        ],
    )
    # the debug preset's small projector would understate the contrastive losses' cost
    cfg.objective = ObjectiveConfig(**fields)
    state = build_state(cfg, DistInfo(device=device))
    images = sequences // cfg.objective.num_views
    T, V = state.student.config.block_size, state.student.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    batch = (
        torch.randint(0, V, (images, cfg.objective.num_views, T), generator=gen),
        torch.randint(0, state.student.config.num_classes, (images,), generator=gen),
    )
    return state, batch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_step(state, batch, device, step: int = 0) -> float:
    sync(device)
    start = time.perf_counter()
    train_step(state, [batch], step)
    sync(device)
    return time.perf_counter() - start


def peak_memory_mb(model, variant, sequences, precision, device, block_size, overrides) -> float:
    """Peak memory of one case, measured alone in a child process (this same script)."""
    spec = json.dumps([model, variant, sequences, precision, device, block_size, list(overrides)])
    cmd = [sys.executable, __file__, "--memory-of", spec]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return float(out.strip().splitlines()[-1])


def _memory_of(spec: str) -> None:
    model, variant, sequences, precision, device, block_size, overrides = json.loads(spec)
    dev = torch.device(device)
    state, batch = make_state(model, variant, sequences, precision, dev, block_size, overrides)
    for step in range(2):  # the second step has optimizer state and warm allocator caches
        train_step(state, [batch], TIMED_AT.get(variant, step))
    if dev.type == "cuda":
        print(torch.cuda.max_memory_allocated() / 2**20)
    else:
        # VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec from the parent process
        with open("/proc/self/status") as f:
            hwm_kib = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
        print(hwm_kib / 1024)


# ----------------------------------------------------------------------------- a model at a precision


def bench(
    model: str,
    sequences: int,
    precision: str,
    repeats: int,
    device: torch.device,
    block_size: int,
    variants: list[str],
    peaks: dict[str, float],
    overrides: list[str] = (),
    memory: bool = True,
) -> list[dict]:
    """Time every variant; one result dict per variant (times in seconds, memory in MiB)."""
    times: dict[str, list[float]] = {v: [] for v in variants}
    info: dict[str, dict] = {}

    def describe(name, state):
        obj = state.cfg.objective
        images = sequences // obj.num_views
        ssl = obj.ssl_on(TIMED_AT.get(name, 0), state.cfg.train.steps)
        info[name] = dict(
            views=obj.num_views,
            images=images,
            flops=step_flops(state.student.config, obj, images, ssl=ssl),
            params=sum(p.numel() for p in state.student.parameters()),
        )

    drift = None
    if len(variants) <= 2:  # alternate step by step, so noise hits both alike
        states = {v: make_state(model, v, sequences, precision, device, block_size, overrides) for v in variants}
        for name, (state, _) in states.items():
            describe(name, state)
        for _ in range(repeats + 1):  # the first round warms up
            for name, (state, batch) in states.items():
                times[name].append(time_step(state, batch, device, TIMED_AT.get(name, 0)))
        del states
    else:  # one at a time (nine GPT-B states would not fit a small machine), baseline again at the end
        order = variants + (["baseline"] if "baseline" in variants else [])
        for k, name in enumerate(order):
            state, batch = make_state(model, name, sequences, precision, device, block_size, overrides)
            describe(name, state)
            run = [time_step(state, batch, device, TIMED_AT.get(name, 0)) for _ in range(repeats + 1)]
            if k == len(variants):  # the second baseline measurement
                drift = min(run[1:]) / min(times["baseline"][1:])
            times[name].extend(run if not times[name] else run[1:])
            del state, batch
            if device.type == "cuda":
                torch.cuda.empty_cache()
    rows = []
    for name in variants:
        best = min(times[name][1:]) if len(times[name]) > 1 else times[name][0]
        row = dict(model=model, precision=precision, variant=name, sequences=sequences, **info[name])
        row.update(
            s_per_step=best,
            s_per_seq=best / sequences,
            s_per_image=best / info[name]["images"],
            steps_per_s=1 / best,
            tflops_per_step=info[name]["flops"] / 1e12,
            mfu=info[name]["flops"] / best / peaks[precision],
            peak_mb=(
                peak_memory_mb(model, name, sequences, precision, str(device), block_size, overrides)
                if memory
                else None
            ),
        )
        rows.append(row)
    if drift is not None:
        next(r for r in rows if r["variant"] == "baseline")["baseline_drift"] = drift
    return rows


def compile_gain(
    model: str,
    sequences: int,
    precision: str,
    repeats: int,
    device: torch.device,
    block_size: int,
    variants: list[str],
    overrides: list[str] = (),
) -> list[str]:
    """train.compile=false and =true for each variant, steps alternated in one process (noise hits both
    alike); one table line per variant: eager and compiled s/step, the gain, and the first compiled step
    (which compiles the student, the teacher and the losses)."""
    states = {}
    for name in variants:
        for compiled in (False, True):
            extra = [*overrides, f"train.compile={'true' if compiled else 'false'}"]
            states[name, compiled] = make_state(model, name, sequences, precision, device, block_size, extra)
    times: dict = {key: [] for key in states}
    for _ in range(repeats + 1):  # the first round warms up and compiles
        for key, (state, batch) in states.items():
            times[key].append(time_step(state, batch, device, TIMED_AT.get(key[0], 0)))
    lines = []
    for name in variants:
        eager, compiled = min(times[name, False][1:]), min(times[name, True][1:])
        lines.append(
            f"| {model} | {precision} | {name} | {sequences} | {eager:.3f} | {compiled:.3f} | {eager / compiled:.2f} "
            f"| {times[name, True][0]:.0f} |"
        )
    return lines


def pair_line(rows: list[dict], device: torch.device) -> str | None:
    """The original baseline-vs-ST-AR line (its columns are unchanged)."""
    by = {r["variant"]: r for r in rows}
    if not {"baseline", "star"} <= set(by):
        return None
    b, s = by["baseline"], by["star"]
    mem = lambda r: f"{r['peak_mb']:.0f}" if r["peak_mb"] is not None else "-"
    line = (
        f"| {b['model']} | {b['precision']} | {b['sequences']} | {b['s_per_step']:.3f} | {s['s_per_step']:.3f} | "
        f"{b['s_per_seq']:.4f} | {s['s_per_seq']:.4f} | {s['s_per_step'] / b['s_per_step']:.2f} | "
        f"{mem(b)} | {mem(s)} |"
    )
    if device.type == "cuda":
        line += f" MFU baseline {b['mfu']:.1%}, steps/s {b['steps_per_s']:.2f} vs {s['steps_per_s']:.2f} |"
    return line


def variant_line(row: dict, rows: list[dict]) -> str:
    base = next((r for r in rows if r["variant"] == "baseline"), None)
    per_image = f"{row['s_per_image'] / base['s_per_image']:.2f}" if base else "-"
    per_seq = f"{row['s_per_seq'] / base['s_per_seq']:.2f}" if base else "-"
    mem = f"{row['peak_mb']:.0f}" if row["peak_mb"] is not None else "-"
    return (
        f"| {row['model']} | {row['precision']} | {row['variant']} | {row['images']} x {row['views']} | "
        f"{row['s_per_step']:.3f} | {row['s_per_seq']:.4f} | {row['s_per_image']:.4f} | {per_seq} | {per_image} | "
        f"{row['tflops_per_step']:.3f} | {row['mfu']:.1%} | {mem} |"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="GPT-S,GPT-B")
    p.add_argument("--sequences", type=int, default=8, help="sequences per step (baseline S x 1, ST-AR S/2 x 2)")
    p.add_argument("--precisions", default="fp32,bf16")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--block-size", type=int, default=256, help="tokens per image (256 = 16x16, ImageNet 256 px)")
    p.add_argument("--device", default="auto")
    p.add_argument("--variants", default="baseline,star", help="comma-separated variants, or paper, or all")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="section.field=value",
        help="a run-config override for every case, e.g. train.compile=true (repeatable)",
    )
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument(
        "--compare-compile", action="store_true", help="time each case eager and with train.compile=true, alternated"
    )
    p.add_argument("--json", metavar="PATH", help="also write the rows and the peaks as JSON (rewritten per row)")
    p.add_argument("--memory-of", help=argparse.SUPPRESS)  # internal: measure one case in this process
    args = p.parse_args()
    if args.memory_of:
        return _memory_of(args.memory_of)
    device = torch.device(
        "cuda"
        if args.device == "auto" and torch.cuda.is_available()
        else ("cpu" if args.device == "auto" else args.device)
    )
    variants = parse_variants(args.variants)
    precisions = args.precisions.split(",")
    peaks = {name: matmul_peak(dtype, device) for name, dtype in PRECISION_DTYPE.items()}
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} threads"
    print(
        f"# train_step  torch {torch.__version__}, device {device} ({where}), "
        f"{args.block_size} tokens per sequence; best of {args.repeats} after a warm-up"
    )
    print(f"# matmul peaks measured now: fp32 {rate(peaks['fp32'])}, bf16 {rate(peaks['bf16'])}")
    if args.set:
        print(f"# overrides: {' '.join(args.set)}")
    results: dict = {
        "device": str(device),
        "device_name": where,
        "torch": torch.__version__,
        "peaks": peaks,
        "rows": [],
    }
    if args.compare_compile:
        print("| model | precision | variant | sequences | eager s/step | compiled s/step | gain | first compiled s |")
        print("|---|---|---|---|---|---|---|---|")
        for model in args.models.split(","):
            for precision in precisions:
                lines = compile_gain(
                    model, args.sequences, precision, args.repeats, device, args.block_size, variants, args.set
                )
                print("\n".join(lines), flush=True)
        return
    all_rows: list[dict] = []
    pairs = {"baseline", "star"} <= set(variants)
    if pairs:
        print(
            "| model | precision | sequences | baseline s/step | ST-AR s/step | baseline s/seq | ST-AR s/seq | "
            "ratio | baseline peak MB | ST-AR peak MB |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|")
    for model in args.models.split(","):
        for precision in precisions:
            rows = bench(
                model,
                args.sequences,
                precision,
                args.repeats,
                device,
                args.block_size,
                variants,
                peaks,
                args.set,
                memory=not args.no_memory,
            )
            all_rows += rows
            line = pair_line(rows, device)
            if line:
                print(line, flush=True)
            if args.json:
                results["rows"] = all_rows
                tmp = f"{args.json}.tmp"
                with open(tmp, "w") as f:
                    json.dump(results, f, indent=1)
                os.replace(tmp, args.json)
    print()
    print("Cost per image (an ST-AR image brings num_views sequences); ratios against the baseline of the same run")
    print(
        "| model | precision | variant | images x views | s/step | s/seq | s/image | seq ratio | image ratio | "
        "TFLOP/step | MFU | peak MB |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for model in args.models.split(","):
        for precision in precisions:
            rows = [r for r in all_rows if r["model"] == model and r["precision"] == precision]
            for row in rows:
                print(variant_line(row, rows))
    for row in all_rows:
        if "baseline_drift" in row:
            print(
                f"# {row['model']} {row['precision']}: the baseline measured again at the end took "
                f"{row['baseline_drift']:.2f}x its first time"
            )


if __name__ == "__main__":
    main()
