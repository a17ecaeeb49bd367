"""Masked-student attention: dense-mask SDPA vs FlexAttention, at GPT-B's attention shape.

The ST-AR student attends causally with a random quarter of the keys hidden from every query
but their own (objectives/masks.py). SDPA takes that as a dense (B, 1, S, S) bool mask, which
rules out the flash kernel; FlexAttention takes a BlockMask, skips the blocks above the diagonal
and evaluates the mask only in the blocks it cuts. Cases, all on the same q, k, v and mask:

  sdpa causal         no mask, is_causal (the teacher's attention; the flash kernel on GPU)
  sdpa dense mask     the student as the library runs it with attention="sdpa"
  flex (hidden keys)  compiled flex_attention, BlockMask from the (B, S) flags
  flex (from dense)   compiled flex_attention, BlockMask reading the dense mask (what the model
                      builds when handed a dense mask with attention="flex")

Times are forward, and forward + backward where the device supports it (this torch has no
FlexAttention backward on CPU), best of --repeats after a warm-up; the mask builds are timed
apart. With --model the whole masked student forward + backward of that preset is timed with
attention="sdpa" and "flex" as well.

    python benchmarks/attention_speed.py                         # CUDA if present: bf16, 8 x 12 x 256 x 64
    python benchmarks/attention_speed.py --device cpu --dtype fp32 --batch 4
    python benchmarks/attention_speed.py --model GPT-B --batch 8
"""

from __future__ import annotations

import argparse
import platform
import time

import torch
import torch.nn.functional as F

from st_ar.models import layers
from st_ar.models.gpt import GPT, GPTConfig
from st_ar.objectives.masks import key_masked_block_mask, key_masked_causal_mask, sample_hidden_keys


def timed(fn, device: torch.device, repeats: int) -> float:
    """Best of ``repeats`` calls after one warm-up, in milliseconds (the minimum: noise only adds)."""

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    fn()
    sync()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def attention_cases(args, device, dtype) -> list[str]:
    B, H, S, D = args.batch, args.heads, args.tokens, args.head_dim
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, S, D, generator=gen).to(device, dtype) for _ in range(3))
    hidden = sample_hidden_keys(B, S, args.mask_ratio, generator=gen).to(device)
    dense = key_masked_causal_mask(hidden)
    lines = []
    t_dense = timed(lambda: key_masked_causal_mask(hidden), device, args.repeats)
    lines.append(f"| build dense mask (B, 1, S, S) | {t_dense:.3f} | |")
    cases = {
        "sdpa causal": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
        "sdpa dense mask": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=dense),
    }
    if layers.flex_available():
        t0 = time.perf_counter()
        block = key_masked_block_mask(hidden)
        from_dense = layers.block_mask_from_dense(dense, B, S, device)
        t_first = (time.perf_counter() - t0) * 1e3
        t_block = timed(lambda: key_masked_block_mask(hidden), device, args.repeats)
        t_from = timed(lambda: layers.block_mask_from_dense(dense, B, S, device), device, args.repeats)
        lines.append(f"| build BlockMask from hidden keys | {t_block:.3f} | first two builds {t_first:.0f} ms |")
        lines.append(f"| build BlockMask from dense mask | {t_from:.3f} | sparsity {block.sparsity():.0f}% |")
        flex = torch.compile(layers.flex_attention, dynamic=False)
        t0 = time.perf_counter()
        with torch.no_grad():
            flex(q, k, v, block_mask=block)
        lines.append(f"| compile flex_attention (first call) | {(time.perf_counter() - t0) * 1e3:.0f} | |")
        cases["flex (hidden keys)"] = lambda q, k, v: flex(q, k, v, block_mask=block)
        cases["flex (from dense)"] = lambda q, k, v: flex(q, k, v, block_mask=from_dense)
    else:
        lines.append(f"| flex_attention | | not in torch {torch.__version__} |")
    ref = cases["sdpa dense mask"](q, k, v).float()
    backward = device.type == "cuda"
    qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))
    for name, fn in cases.items():
        with torch.no_grad():
            fwd = timed(lambda fn=fn: fn(q, k, v), device, args.repeats)
            err = (fn(q, k, v).float() - ref).abs().max().item() if name != "sdpa causal" else float("nan")
        note = f"max |out - sdpa dense| {err:.1e}" if err == err else "reference floor (no key mask)"
        if backward:
            both = timed(lambda fn=fn: fn(qg, kg, vg).sum().backward(), device, args.repeats)
            lines.append(f"| {name} | {fwd:.3f} | fwd+bwd {both:.3f} ms; {note} |")
        else:
            lines.append(f"| {name} | {fwd:.3f} | {note} (no flex backward on {device.type}) |")
    return lines


def model_cases(args, device, dtype) -> list[str]:
    torch.manual_seed(0)
    config = GPTConfig.from_name(args.model, block_size=args.tokens)
    model = GPT(config).to(device)
    model.train()
    S = config.block_size  # [class, x_0 .. x_{T-2}]: T inputs
    tokens = torch.randint(0, config.vocab_size, (args.batch, S - 1), device=device)
    cond = torch.randint(0, config.num_classes, (args.batch,), device=device)
    hidden = sample_hidden_keys(args.batch, S, args.mask_ratio, device=device)
    dense = key_masked_causal_mask(hidden)
    backends = ["sdpa"] + (["flex"] if layers.flex_available() else [])
    lines = []
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    for backend in backends:

        def step(backend=backend):
            with autocast:
                out = model(tokens, cond, attn_mask=dense, attention=backend)
            if device.type == "cuda" or backend == "sdpa":
                out.logits.float().square().mean().backward()
            model.zero_grad(set_to_none=True)

        if backend == "flex" and device.type != "cuda":
            with torch.no_grad():
                ms = timed(lambda: model(tokens, cond, attn_mask=dense, attention="flex"), device, args.repeats)
            lines.append(f"| {args.model} student forward, {backend} | {ms:.1f} | forward only (no flex backward) |")
            continue
        ms = timed(step, device, args.repeats)
        lines.append(f"| {args.model} student fwd+bwd, {backend} | {ms:.1f} | {args.batch} x {S} tokens |")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None, help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--batch", type=int, default=8, help="sequences (ST-AR: images x views)")
    p.add_argument("--heads", type=int, default=12, help="GPT-B: 12")
    p.add_argument("--head-dim", type=int, default=64, help="GPT-B: 64")
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--mask-ratio", type=float, default=0.25, help="ST-AR (paper): 0.25")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--model", default=None, help="also time this preset's masked student, e.g. GPT-B")
    args = p.parse_args()
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[
        args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    ]
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    print(f"# attention_speed  torch {torch.__version__}, {where}, {torch.get_num_threads()} threads, {dtype}")
    print(f"# {args.batch} x {args.heads} heads x {args.tokens} tokens x {args.head_dim}, mask ratio {args.mask_ratio}")
    print("| case | ms | note |")
    print("|---|---|---|")
    for line in attention_cases(args, device, dtype):
        print(line, flush=True)
    if args.model:
        for line in model_cases(args, device, dtype):
            print(line, flush=True)


if __name__ == "__main__":
    main()
