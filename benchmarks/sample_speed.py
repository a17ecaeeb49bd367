"""Sampling speed: KV cache vs full recomputation, fp32 vs bf16, eager vs compiled, against floors.

Measures, in one process and one run (so the figures can be compared with each other):
  - memory bandwidth: a large tensor copy (bytes read + written per second);
  - cached decoding: ms per decode step and generated tokens/s for N images x T tokens with CFG
    (2N sequences per step), using the library's real ``generate``;
  - compiled static decoding: the same with ``generate(compile=True)`` (one compiled graph for
    every position; CUDA graphs on CUDA), its compile time apart (skip with --no-compile);
    with --freeze also one step of it against the same step compiled with the weights frozen in
    as constants (a route measured, not taken: docs/performance.md);
  - the bandwidth floor: a decode step must read every weight of the blocks and the head once,
    so weight bytes / bandwidth bounds it from below; each route prints the share of that floor
    it reaches (floor / measured);
  - the matmul floor: the same step's linear layers alone at 2N rows (weights read once);
  - on CPU, one cached step with the layers' few-rows route (W @ xᵀ, the default) against F.linear;
  - recomputation: one full forward over the whole prefix (what a step costs without a cache)
    at several prefix lengths, against a cached step at the same length;
  - bf16 weights/activations: the same generation, and its agreement with fp32 (share of
    identical greedy tokens, free-running and teacher-forced);
  - with --profile, where the time of one eager fp32 generation goes (torch.profiler, by operator),
    and so how much fusing everything but the linear layers' matmuls could gain at most.

    python benchmarks/sample_speed.py                        # GPT-B and GPT-S, 4 images, 256 tokens
    python benchmarks/sample_speed.py --models GPT-S --tokens 64
    python benchmarks/sample_speed.py --models GPT-B --no-recompute --no-compile --no-bf16 --int8   # int8
    python benchmarks/sample_speed.py --models GPT-B --no-recompute --fp16-weights   # fp16 packed weights
    python benchmarks/sample_speed.py --models GPT-B,GPT-S --no-recompute --no-bf16 --no-compile --freeze
    python benchmarks/sample_speed.py --models GPT-B --no-recompute --no-bf16 --no-compile --profile
    python benchmarks/sample_speed.py --device cuda --no-recompute   # on a GPU
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from st_ar.models.gpt import GPT, GPTConfig
from st_ar.sampling import KVCache, compiled_decode_step, decode_one_token, generate, prefill, static_cache


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, repeats: int = 3) -> float:
    """Best of ``repeats`` timed calls after one warm-up call, in seconds.

    The minimum, not the mean: on a shared machine the noise only ever adds time.
    """
    fn()  # warm-up: first calls allocate and pick kernels
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return min(times)


def copy_bandwidth(device: torch.device, mib: int = 512) -> float:
    """Bytes per second of a large device copy, counting the read and the write."""
    src = torch.empty(mib * 2**20 // 4, dtype=torch.float32, device=device).normal_()
    dst = torch.empty_like(src)
    seconds = timed(lambda: dst.copy_(src), repeats=5)
    return 2 * src.numel() * src.element_size() / seconds


def decode_bytes(model: GPT, rows: int, num_tokens: int) -> tuple[int, int]:
    """(weight bytes, mean KV-cache bytes) a decode step must read.

    Weights: every parameter but the two embedding tables, of which a step reads a few rows.
    KV cache: keys and values of every layer at the mean position of the eager path (the static
    path reads the whole buffer).
    """
    skip = {id(model.tok_embeddings.weight), id(model.cls_embedding.embedding_table.weight)}
    weights = sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in skip)
    c = model.config
    dtype_bytes = model.tok_embeddings.weight.element_size()
    kv = 2 * c.n_layer * rows * c.kv_heads * c.head_dim * (1 + num_tokens / 2) * dtype_bytes
    return weights, int(kv)


def random_model(name: str, seed: int = 0, device: str = "cpu") -> GPT:
    torch.manual_seed(seed)
    model = GPT(GPTConfig.from_name(name)).to(device).eval()
    # LlamaGen zero-inits the head, which would make every logit 0; give it weights of the
    # same scale as the rest so sampling and greedy agreement mean something.
    torch.nn.init.normal_(model.output.weight, std=model.config.initializer_range)
    return model


def matmul_floor_ms(model: GPT, rows: int) -> float:
    """Time of the decode step's linear layers alone (blocks + head) at ``rows`` rows."""
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    inputs = {m: torch.randn(rows, 1, m.in_features, dtype=m.weight.dtype, device=m.weight.device) for m in linears}

    @torch.no_grad()
    def step():
        for m in linears:
            m(inputs[m])

    return timed(step, repeats=10) * 1e3


@torch.no_grad()
def cached_step_ms(model: GPT, rows: int, prefix: int) -> float:
    """One decode step at sequence position ``prefix`` with a cache already holding the prefix."""
    device = model.output.weight.device
    cache = KVCache.for_model(model, rows)
    cond = torch.zeros(rows, dtype=torch.long, device=device)
    prefill(model, cond, cache)
    tokens = torch.randint(0, model.config.vocab_size, (rows, prefix), device=device)
    model(tokens[:, : prefix - 1], kv_cache=cache, start_pos=1)  # fill positions 1..prefix-1
    return timed(lambda: decode_one_token(model, tokens[:, -1], prefix, cache), repeats=10) * 1e3


@torch.no_grad()
def recompute_step_ms(model: GPT, rows: int, prefix: int) -> float:
    """Without a cache a step runs the whole sequence so far: class token + ``prefix`` tokens."""
    device = model.output.weight.device
    cond = torch.zeros(rows, dtype=torch.long, device=device)
    tokens = torch.randint(0, model.config.vocab_size, (rows, prefix), device=device)
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


def bench(
    name: str,
    images: int,
    num_tokens: int,
    cfg: float,
    recompute_at: list[int],
    device: str = "cpu",
    compile: bool = True,
    bandwidth: float | None = None,
    stored_weights: tuple[str, ...] = (),
    bf16: bool = True,
    freeze: bool = False,
    profile: bool = False,
) -> list[str]:
    rows = 2 * images if cfg != 1.0 else images
    classes = torch.arange(images, device=device)
    lines = []
    model = random_model(name, device=device)
    floor = matmul_floor_ms(model, rows)
    results = {}
    # fp32 routes first: the cast to bf16 rounds the weights for good
    routes = [(label, dtype, c) for label, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)) for c in (0, 1)]
    routes = [r for r in routes if (compile or not r[2]) and (bf16 or r[0] != "bf16")]
    for label, dtype, compiled in routes:
        m = model.to(dtype)
        gen = torch.Generator(device).manual_seed(0)
        run = lambda m=m, gen=gen, compiled=compiled: generate(
            m, classes, num_tokens=num_tokens, cfg_scale=cfg, generator=gen, compile=compiled
        )
        note = []
        if compiled:
            start = time.perf_counter()
            run()  # compiles the static step for this shape and dtype
            sync()
            note.append(f"compile + first run {time.perf_counter() - start:.0f} s")
        seconds = timed(run, repeats=2)
        results[(label, compiled)] = seconds
        ms = seconds / num_tokens * 1e3
        if label == "fp32" and not compiled:
            note.append(f"{ms / floor:.2f}x matmul floor ({floor:.1f} ms)")
        elif compiled:
            note.append(f"speed-up over eager {label}: {results[(label, False)] / seconds:.2f}x")
        else:
            note.append(f"{results[('fp32', False)] / seconds:.2f}x faster than fp32")
        if bandwidth:
            weights, kv = decode_bytes(m, rows, num_tokens)
            bw_floor = weights / bandwidth * 1e3
            note.append(
                f"bandwidth floor {bw_floor:.1f} ms ({weights / 1e6:.0f} MB weights; KV cache adds "
                f"{kv / 1e6:.0f} MB), {bw_floor / ms:.0%} of it reached"
            )
        route = "static compiled" if compiled else "KV cache"
        lines.append(
            f"| {name} | {route}, {label} | {ms:.1f} | {images * num_tokens / seconds:.0f} | {'; '.join(note)} |"
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
    if bf16:
        half = random_model(name, device=device).to(torch.bfloat16)
        free, forced = greedy_agreement(model, half, classes, num_tokens, cfg)
        lines.append(
            f"| {name} | bf16 vs fp32 greedy tokens | | | identical: {free:.1%} free-running, "
            f"{forced:.1%} teacher-forced |"
        )
    if device == "cpu":
        prefix = min(128, model.config.block_size)
        few, plain = few_rows_step_ms(model, rows, prefix)
        lines.append(
            f"| {name} | step at {prefix} tokens: few-rows linear vs F.linear | {few:.1f} vs {plain:.1f} | | "
            f"few-rows route {plain / few:.2f}x the speed |"
        )
    if freeze:
        shared, frozen, seconds = frozen_step_ms(model, rows, num_tokens // 2)
        lines.append(
            f"| {name} | step at {num_tokens // 2} tokens: static compiled vs frozen weights | {shared:.1f} vs "
            f"{frozen:.1f} | | frozen {shared / frozen:.2f}x the speed; its compile {seconds:.0f} s |"
        )
    if profile:
        lines += operator_shares(name, model, classes, num_tokens, cfg)
    for kind in stored_weights:
        lines += stored_weights_route(name, kind, classes, num_tokens, cfg, results[("fp32", False)], bandwidth)
    return lines


def alternating_best(fns: dict, rounds: int = 2) -> dict:
    """The best of ``rounds`` calls of each of ``fns`` (name -> timing function), called in turn so that a
    drift in the machine's speed hits every one alike."""
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            times[name].append(fn())
    return {name: min(t) for name, t in times.items()}


def few_rows_step_ms(model: GPT, rows: int, prefix: int) -> tuple[float, float]:
    """A cached fp32 step with the layers' few-rows CPU route (models/layers.Linear, the default) and
    without it (F.linear for every row count), alternating: (few-rows ms, F.linear ms)."""
    from st_ar.models.layers import Linear

    default = Linear.FEW_ROWS

    def step(few_rows: int) -> float:
        Linear.FEW_ROWS = few_rows
        return cached_step_ms(model, rows, prefix)

    try:
        best = alternating_best({"plain": lambda: step(0), "few": lambda: step(default)})
    finally:
        Linear.FEW_ROWS = default
    return best["few"], best["plain"]


def operator_shares(
    name: str, model: GPT, classes: torch.Tensor, num_tokens: int, cfg: float, top: int = 8
) -> list[str]:
    """Table rows: the operators taking the most self time in one eager generation, with their shares."""
    from torch.profiler import ProfilerActivity, profile

    run = lambda: generate(model, classes, num_tokens=num_tokens, cfg_scale=cfg)  # noqa: E731
    run()  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        run()
        ms = (time.perf_counter() - start) / num_tokens * 1e3
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    head = "under the profiler; self CPU time by operator below"
    lines = [f"| {name} | profiled eager fp32 generation | {ms:.1f} | | {head} |"]
    for e in events[:top]:
        share = e.self_cpu_time_total / total
        lines.append(f"| | {e.key} | | | {share:.1%} of the time, {e.count // num_tokens} calls per step |")
    mm = sum(e.self_cpu_time_total for e in events if e.key in ("aten::mm", "aten::addmm")) / total
    lines.append(
        f"| | linear layers' matmuls (aten::mm, aten::addmm) | | | {mm:.1%}: fusing everything else away would "
        f"make a step at most {1 / mm:.2f}x faster |"
    )
    return lines


@torch.no_grad()
def frozen_step_ms(model: GPT, rows: int, pos: int) -> tuple[float, float, float]:
    """One static decode step at ``pos``: the library's compiled step (the model an argument, one graph
    for every model of a shape) against the same step compiled with this model's weights frozen in as
    constants (Inductor freezing: oneDNN-prepacked linears on CPU). A route measured, not taken:
    (shared ms, frozen ms, the frozen step's compile seconds)."""
    device = model.output.weight.device
    cache = static_cache(model, rows)
    token = torch.zeros(rows, dtype=torch.long, device=device)
    position = torch.full((), pos, dtype=torch.long, device=device)
    shared = compiled_decode_step(device)
    frozen = torch.compile(
        lambda t, p, c: decode_one_token(model, t, p, c), fullgraph=True, dynamic=False, options={"freezing": True}
    )
    start = time.perf_counter()
    frozen(token, position, cache)
    seconds = time.perf_counter() - start
    shared(model, token, position, cache)
    best = alternating_best(
        {
            "shared": lambda: timed(lambda: shared(model, token, position, cache), repeats=10),
            "frozen": lambda: timed(lambda: frozen(token, position, cache), repeats=10),
        }
    )
    return best["shared"] * 1e3, best["frozen"] * 1e3, seconds


def stored_weights_route(name, kind, classes, num_tokens, cfg, fp32_seconds, bandwidth) -> list[str]:
    """Eager KV-cache decode with opt-in stored weights (models/quantize.py): "int8" (block weights) or "fp16"
    (fbgemm-packed block and head weights, fp32 activations), against the fp32 model (fresh: the bf16 routes
    rounded the other one's weights)."""
    from st_ar.models.quantize import pack_fp16_weights, quantize_int8_weights

    convert, case = {
        "int8": (quantize_int8_weights, "int8 block weights"),
        "fp16": (pack_fp16_weights, "fp16 packed weights"),
    }[kind]
    model = random_model(name, device=str(classes.device))
    other = convert(random_model(name, device=str(classes.device)))
    gen = torch.Generator(classes.device).manual_seed(0)
    seconds = timed(lambda: generate(other, classes, num_tokens=num_tokens, cfg_scale=cfg, generator=gen), repeats=2)
    ms = seconds / num_tokens * 1e3
    note = [f"{fp32_seconds / seconds:.2f}x the speed of fp32"]
    if bandwidth:
        weights = decode_bytes(other, len(classes), num_tokens)[0]  # the parameters left in the model's dtype
        weights += sum(m.stored_bytes() for m in other.modules() if hasattr(m, "stored_bytes"))
        floor = weights / bandwidth * 1e3
        note.append(f"bandwidth floor {floor:.1f} ms ({weights / 1e6:.0f} MB weights), {floor / ms:.0%} of it reached")
    free, forced = greedy_agreement(model, other, classes, num_tokens, cfg)
    return [
        f"| {name} | KV cache, {case} | {ms:.1f} | {classes.numel() * num_tokens / seconds:.0f} | {'; '.join(note)} |",
        f"| {name} | {kind} vs fp32 greedy tokens | | | identical: {free:.1%} free-running, "
        f"{forced:.1%} teacher-forced |",
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="GPT-B,GPT-S")
    p.add_argument("--images", type=int, default=4)
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--cfg-scale", type=float, default=2.0)
    p.add_argument("--recompute-at", default="64,256", help="prefix lengths at which to time recomputation")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--no-compile", action="store_true", help="skip the compiled static decode routes")
    p.add_argument("--no-recompute", action="store_true", help="skip the recomputation comparison")
    p.add_argument(
        "--freeze", action="store_true", help="CPU: also one compiled static step with the weights frozen in"
    )
    p.add_argument("--int8", action="store_true", help="also weight-only int8 block weights (opt-in route)")
    p.add_argument(
        "--fp16-weights", action="store_true", help="also fbgemm-packed fp16 weights, fp32 activations (CPU opt-in)"
    )
    p.add_argument("--no-bf16", action="store_true", help="skip the bf16 routes (slow where bf16 has no fast kernels)")
    p.add_argument("--profile", action="store_true", help="also where one eager fp32 generation spends its time")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.profile and device.type != "cpu":
        p.error("--profile splits CPU time by operator (a GPU step's time is on the device): drop --profile")
    if args.freeze and device.type != "cpu":
        p.error("--freeze compares CPU steps (a CUDA step runs under CUDA graphs): drop --freeze")
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    print(f"# sample_speed  torch {torch.__version__}, {torch.get_num_threads()} threads, {where}")
    print(f"# {args.images} images x {args.tokens} tokens, CFG {args.cfg_scale}")
    bandwidth = copy_bandwidth(device)
    print(f"# memory bandwidth (512 MiB copy, read + write): {bandwidth / 1e9:.1f} GB/s")
    print("| model | case | ms / step | tokens / s | note |")
    print("|---|---|---|---|---|")
    recompute_at = [] if args.no_recompute else [int(x) for x in args.recompute_at.split(",")]
    for name in args.models.split(","):
        for line in bench(
            name,
            args.images,
            args.tokens,
            args.cfg_scale,
            recompute_at,
            device=args.device,
            compile=not args.no_compile,
            bandwidth=bandwidth,
            stored_weights=("int8",) * args.int8 + ("fp16",) * args.fp16_weights,
            bf16=not args.no_bf16,
            freeze=args.freeze,
            profile=args.profile,
        ):
            print(line, flush=True)


if __name__ == "__main__":
    main()
