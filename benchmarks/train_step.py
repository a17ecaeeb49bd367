"""Training-step cost: LlamaGen baseline vs ST-AR, on the same number of sequences.

Both steps run the library's real ``train_step`` (random weights and random codes: the cost does
not depend on their values), alternating in one process so the machine's noise hits both alike:

  baseline  2B images x 1 view : AR loss, no teacher
  ST-AR     B images x 2 views : masked student + AR + MIM + step + view, EMA teacher forward

and prints seconds per sequence, their ratio and the peak memory each step adds. The teacher
forward is about a third of a forward-backward, so the floor of the ratio is near 1.33.

    python benchmarks/train_step.py                          # GPT-S and GPT-B, fp32 and bf16 autocast
    python benchmarks/train_step.py --models GPT-B --sequences 4 --precisions fp32
On a GPU it also prints model FLOPs utilisation (6 x params x tokens, plus the teacher's 2 x).
"""

from __future__ import annotations

import argparse
import os
import threading
import time

import torch

from st_ar.config import BASELINE, apply_overrides, preset
from st_ar.distributed import DistInfo
from st_ar.objectives.total import ObjectiveConfig
from st_ar.train.loop import build_state, train_step


class PeakRSS:
    """Peak resident memory above the level at entry, sampled every millisecond (CPU)."""

    def __enter__(self):
        self.start = self.peak = self._rss()
        self._stop = False
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self):
        while not self._stop:
            self.peak = max(self.peak, self._rss())
            time.sleep(0.001)

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __exit__(self, *exc):
        self._stop = True
        self._thread.join()

    @property
    def added_mb(self) -> float:
        return (self.peak - self.start) / 2**20


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


def time_step(state, batch, device) -> tuple[float, float]:
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        train_step(state, [batch], 0)
        torch.cuda.synchronize()
        return time.perf_counter() - start, torch.cuda.max_memory_allocated() / 2**20
    with PeakRSS() as mem:
        start = time.perf_counter()
        train_step(state, [batch], 0)
        seconds = time.perf_counter() - start
    return seconds, mem.added_mb


def bench(model: str, sequences: int, precision: str, repeats: int, device: torch.device, block_size: int):
    base, base_batch = make_state(model, False, sequences, precision, device, block_size)
    star, star_batch = make_state(model, True, sequences, precision, device, block_size)
    times = {"baseline": [], "star": []}
    mems = {"baseline": 0.0, "star": 0.0}
    for _ in range(repeats + 1):  # first round warms up, alternate so noise hits both
        for name, state, batch in (("baseline", base, base_batch), ("star", star, star_batch)):
            t, m = time_step(state, batch, device)
            times[name].append(t)
            mems[name] = max(mems[name], m)
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
    args = p.parse_args()
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
