"""Sampling speed: KV cache vs full recomputation, fp32 vs bf16, against the matmul floor.

Measures, in one process and one run (so the figures can be compared with each other):
  - cached decoding: ms per decode step and generated tokens/s for N images x T tokens with CFG
    (2N sequences per step), using the library's real ``generate``;
  - the matmul floor: the same step's linear layers alone at 2N rows (weights read once);
  - recomputation: one full forward over the whole prefix (what a step costs without a cache)
    at several prefix lengths, against a cached step at the same length;
  - bf16 weights/activations: the same generation, and its agreement with fp32 (share of
    identical greedy tokens, free-running and teacher-forced).

    python benchmarks/sample_speed.py                        # GPT-B and GPT-S, 4 images, 256 tokens
    python benchmarks/sample_speed.py --models GPT-S --tokens 64
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from st_ar.models.gpt import GPT, GPTConfig
from st_ar.sampling import KVCache, decode_one_token, generate, prefill


def timed(fn, repeats: int = 3) -> float:
    """Best of ``repeats`` timed calls after one warm-up call, in seconds.

    The minimum, not the mean: on a shared machine the noise only ever adds time.
    """
    fn()  # warm-up: first calls allocate and pick kernels
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def random_model(name: str, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    model = GPT(GPTConfig.from_name(name)).eval()
    # LlamaGen zero-inits the head, which would make every logit 0; give it weights of the
    # same scale as the rest so sampling and greedy agreement mean something.
    torch.nn.init.normal_(model.output.weight, std=model.config.initializer_range)
    return model


def matmul_floor_ms(model: GPT, rows: int) -> float:
    """Time of the decode step's linear layers alone (blocks + head) at ``rows`` rows."""
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    inputs = {m: torch.randn(rows, 1, m.in_features, dtype=m.weight.dtype) for m in linears}

    @torch.no_grad()
    def step():
        for m in linears:
            m(inputs[m])

    return timed(step, repeats=10) * 1e3


@torch.no_grad()
def cached_step_ms(model: GPT, rows: int, prefix: int) -> float:
    """One decode step at sequence position ``prefix`` with a cache already holding the prefix."""
    cache = KVCache.for_model(model, rows)
    cond = torch.zeros(rows, dtype=torch.long)
    prefill(model, cond, cache)
    tokens = torch.randint(0, model.config.vocab_size, (rows, prefix))
    model(tokens[:, : prefix - 1], kv_cache=cache, start_pos=1)  # fill positions 1..prefix-1
    return timed(lambda: decode_one_token(model, tokens[:, -1], prefix, cache), repeats=10) * 1e3


@torch.no_grad()
def recompute_step_ms(model: GPT, rows: int, prefix: int) -> float:
    """Without a cache a step runs the whole sequence so far: class token + ``prefix`` tokens."""
    cond = torch.zeros(rows, dtype=torch.long)
    tokens = torch.randint(0, model.config.vocab_size, (rows, prefix))
    return timed(lambda: model(tokens, cond), repeats=2) * 1e3


def greedy_agreement(ref: GPT, other: GPT, classes: torch.Tensor, num_tokens: int, cfg: float) -> tuple[float, float]:
    """(free-running, teacher-forced) share of identical greedy tokens between two models."""
    a = generate(ref, classes, num_tokens=num_tokens, cfg_scale=cfg, top_k=1)
    b = generate(other, classes, num_tokens=num_tokens, cfg_scale=cfg, top_k=1)
    free = (a == b).float().mean().item()
    # teacher-forced: give both the fp32 tokens and compare each step's guided arg-max
    with torch.no_grad():
        null = torch.full_like(classes, ref.config.null_class)

        def guided_argmax(model):
            c = model(a[:, :-1], classes).logits
            u = model(a[:, :-1], null).logits
            return (u + cfg * (c - u)).argmax(-1)

        forced = (guided_argmax(ref) == guided_argmax(other)).float().mean().item()
    return free, forced


def bench(name: str, images: int, num_tokens: int, cfg: float, recompute_at: list[int]) -> list[str]:
    rows = 2 * images if cfg != 1.0 else images
    classes = torch.arange(images)
    lines = []
    model = random_model(name)
    floor = matmul_floor_ms(model, rows)
    results = {}
    for label, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        m = model.to(dtype)
        gen = torch.Generator().manual_seed(0)
        seconds = timed(
            lambda m=m, gen=gen: generate(m, classes, num_tokens=num_tokens, cfg_scale=cfg, generator=gen), repeats=2
        )
        results[label] = seconds
        ms = seconds / num_tokens * 1e3
        lines.append(
            f"| {name} | KV cache, {label} | {ms:.1f} | {images * num_tokens / seconds:.0f} | "
            + (
                f"{ms / floor:.2f}x matmul floor ({floor:.1f} ms)"
                if label == "fp32"
                else f"{results['fp32'] / seconds:.2f}x faster than fp32"
            )
            + " |"
        )
    model = model.to(torch.float32)
    for prefix in recompute_at:
        if prefix > model.config.block_size:
            continue
        full = recompute_step_ms(model, rows, prefix)
        cached = cached_step_ms(model, rows, prefix)
        lines.append(
            f"| {name} | step at {prefix} tokens: recompute vs cache | {full:.0f} vs {cached:.1f} | | "
            f"cache {full / cached:.0f}x faster |"
        )
    bf16 = random_model(name).to(torch.bfloat16)
    free, forced = greedy_agreement(model, bf16, classes, num_tokens, cfg)
    lines.append(
        f"| {name} | bf16 vs fp32 greedy tokens | | | identical: {free:.1%} free-running, {forced:.1%} teacher-forced |"
    )
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="GPT-B,GPT-S")
    p.add_argument("--images", type=int, default=4)
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--cfg-scale", type=float, default=2.0)
    p.add_argument("--recompute-at", default="64,256", help="prefix lengths at which to time recomputation")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cpu = platform.processor() or platform.machine()
    print(f"# sample_speed  torch {torch.__version__}, {torch.get_num_threads()} threads, {cpu}")
    print(f"# {args.images} images x {args.tokens} tokens, CFG {args.cfg_scale}")
    print("| model | case | ms / step | tokens / s | note |")
    print("|---|---|---|---|---|")
    for name in args.models.split(","):
        for line in bench(
            name, args.images, args.tokens, args.cfg_scale, [int(x) for x in args.recompute_at.split(",")]
        ):
            print(line, flush=True)


if __name__ == "__main__":
    main()
