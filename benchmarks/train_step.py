"""Training-step cost: LlamaGen baseline vs ST-AR, on the same number of sequences.

Both steps run the library's real ``train_step`` (random weights and random codes: the cost does
not depend on their values), alternating in one process so the machine's noise hits both alike:

  baseline  2B images x 1 view : AR loss, no teacher
  ST-AR     B images x 2 views : masked student + AR + MIM + step + view, EMA teacher forward

and prints seconds per sequence and their ratio. Peak memory is measured per case in a fresh
subprocess (the peak resident set of a process that builds that case and runs two steps; on a
GPU the peak allocated memory), so one case's allocations cannot hide the other's. The teacher
forward is about a third of a forward-backward, so the floor of the ratio is near 1.33.

    python benchmarks/train_step.py                          # GPT-S and GPT-B, fp32 and bf16 autocast
    python benchmarks/train_step.py --models GPT-B --sequences 4 --precisions fp32
On a GPU it also prints model FLOPs utilisation (6 x params x tokens, plus the teacher's 2 x).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

import torch

from st_ar.config import BASELINE, apply_overrides, preset
from st_ar.distributed import DistInfo
from st_ar.objectives.total import ObjectiveConfig
from st_ar.train.loop import build_state, train_step


def peak_memory_mb(model: str, star: bool, sequences: int, precision: str, device: str, block_size: int) -> float:
    """Peak memory of one case, measured alone in a child process (this same script)."""
    cmd = [
        sys.executable,
        __file__,
        "--memory-of",
        f"{model},{int(star)},{sequences},{precision},{device},{block_size}",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return float(out.strip().splitlines()[-1])


def _memory_of(spec: str) -> None:
    model, star, sequences, precision, device, block_size = spec.split(",")
    dev = torch.device(device)
    state, batch = make_state(model, bool(int(star)), int(sequences), precision, dev, int(block_size))
    for step in range(2):  # the second step has optimizer state and warm allocator caches
        train_step(state, [batch], step)
    if dev.type == "cuda":
        print(torch.cuda.max_memory_allocated() / 2**20)
    else:
        # VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec from the parent process
        with open("/proc/self/status") as f:
            hwm_kib = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
        print(hwm_kib / 1024)


def make_state(model: str, star: bool, sequences: int, precision: str, device: torch.device, block_size: int):
    cfg = preset("debug")
    cfg = apply_overrides(
        cfg,
        [
            f"model.name={model}",
            f'model.args={{"block_size": {block_size}}}',
            f"train.precision={precision}",
            f"optim.batch_size={sequences // 2 if star else sequences}",
        ],
    )
    cfg.objective = ObjectiveConfig() if star else ObjectiveConfig(**BASELINE)
    state = build_state(cfg, DistInfo(device=device))
    images = sequences // cfg.objective.num_views
    T, V = state.student.config.block_size, state.student.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    batch = (
        torch.randint(0, V, (images, cfg.objective.num_views, T), generator=gen),
        torch.randint(0, 1000, (images,), generator=gen),
    )
    return state, batch


def time_step(state, batch, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    train_step(state, [batch], 0)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def bench(model: str, sequences: int, precision: str, repeats: int, device: torch.device, block_size: int):
    base, base_batch = make_state(model, False, sequences, precision, device, block_size)
    star, star_batch = make_state(model, True, sequences, precision, device, block_size)
    times = {"baseline": [], "star": []}
    for _ in range(repeats + 1):  # first round warms up, alternate so noise hits both
        for name, state, batch in (("baseline", base, base_batch), ("star", star, star_batch)):
            times[name].append(time_step(state, batch, device))
    del base_batch, star_batch
    mems = {
        name: peak_memory_mb(model, name == "star", sequences, precision, str(device), block_size)
        for name in ("baseline", "star")
    }
    best = {k: min(v[1:]) for k, v in times.items()}
    n_params = sum(p.numel() for p in base.student.parameters())
    tokens = sequences * base.student.config.block_size
    ratio = best["star"] / best["baseline"]
    line = (
        f"| {model} | {precision} | {sequences} | {best['baseline']:.3f} | {best['star']:.3f} | "
        f"{best['baseline'] / sequences:.4f} | {best['star'] / sequences:.4f} | {ratio:.2f} | "
        f"{mems['baseline']:.0f} | {mems['star']:.0f} |"
    )
    if device.type == "cuda":
        peak = {"bf16": 989e12, "fp32": 67e12}.get(precision, 989e12)  # H100/H200 dense peaks
        mfu = 6 * n_params * tokens / best["baseline"] / peak
        line += f" MFU baseline {mfu:.1%}, steps/s {1 / best['baseline']:.2f} vs {1 / best['star']:.2f} |"
    return line


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="GPT-S,GPT-B")
    p.add_argument("--sequences", type=int, default=8, help="sequences per step (baseline 2B x 1, ST-AR B x 2)")
    p.add_argument("--precisions", default="fp32,bf16")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--block-size", type=int, default=256, help="tokens per image (256 = 16x16, ImageNet 256 px)")
    p.add_argument("--device", default="auto")
    p.add_argument("--memory-of", help=argparse.SUPPRESS)  # internal: measure one case in this process
    args = p.parse_args()
    if args.memory_of:
        return _memory_of(args.memory_of)
    device = torch.device(
        "cuda"
        if args.device == "auto" and torch.cuda.is_available()
        else ("cpu" if args.device == "auto" else args.device)
    )
    print(
        f"# train_step  torch {torch.__version__}, device {device}, {torch.get_num_threads()} threads, "
        f"{args.block_size} tokens per sequence; best of {args.repeats} after a warm-up"
    )
    print(
        "| model | precision | sequences | baseline s/step | ST-AR s/step | baseline s/seq | ST-AR s/seq | "
        "ratio | baseline peak MB | ST-AR peak MB |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for model in args.models.split(","):
        for precision in args.precisions.split(","):
            print(bench(model, args.sequences, precision, args.repeats, device, args.block_size), flush=True)


if __name__ == "__main__":
    main()
