"""Analysis figures: attention maps and locality (``viz attention``), two views of one image (``viz views``).

attention: DIR/attention.png (rows = steps; heatmap over the token grid, overlay on the decoded image with
--vq-ckpt, per-head maps with --per-head) and DIR/attention.json (locality summary over --num-images).
views: DIR/views.png (the two token grids, feature cosine per step) and DIR/views.json (token agreement,
with and without a small grid-shift search, and feature cosine per step, over --num-images).
"""

from __future__ import annotations

import argparse
import os

import torch

from ..data.codes import read_codes_meta
from ..distributed import resolve_device
from ..eval.probe import default_steps, extract_step_features, first_view_codes
from ..eval.viz import (
    attention_maps,
    feature_cosine,
    mean_locality,
    mean_token_agreement,
    render_attention,
    render_views,
    token_agreement,
)
from ..images import to_uint8
from ..models.gpt import GPT
from ..models.vq import VQModel
from ..runfolder import write_json_atomic
from . import add_device_argument, add_gpt_arguments, add_precision_argument, add_trust_argument, int_list, load_gpt

HELP = "analysis figures: attention maps, token agreement of two views"


def _common(p: argparse.ArgumentParser) -> None:
    add_gpt_arguments(p)
    p.add_argument("--codes", required=True, help="extraction folder")
    p.add_argument("--index", type=int, default=0, help="image drawn in the PNG")
    p.add_argument("--num-images", type=int, default=16, help="images averaged in the JSON summary")
    p.add_argument("--steps", type=int_list, help="comma-separated steps")
    p.add_argument("--batch-size", type=int, default=16)
    add_device_argument(p)
    add_precision_argument(p)
    add_trust_argument(p)
    p.add_argument("--out", required=True, help="output folder")


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="what", required=True, metavar="WHAT")
    a = sub.add_parser("attention", help="attention maps of one block and their locality")
    _common(a)
    a.add_argument("--block", type=int, help="block (1-based); default the last")
    a.add_argument("--view", type=int, default=0, help="crop of each image (codes[i, view])")
    a.add_argument("--cond", choices=["label", "null"], default="label", help="class token: true label or null")
    a.add_argument("--per-head", action="store_true", help="also draw every head")
    a.add_argument("--vq-ckpt", help="tokenizer: overlay the attention on the decoded image")
    a.add_argument("--vq-model", help="VQ preset; optional for our tokenizer checkpoints")
    v = sub.add_parser("views", help="token agreement and feature similarity of two crops of one image")
    _common(v)
    v.add_argument("--view-a", type=int, default=0, help="first crop (codes[i, view_a])")
    v.add_argument("--view-b", type=int, default=1, help="second crop; with --crops ten, 1 = top-right, 5 = flip")
    v.add_argument("--layer", type=int, help="block whose features are compared; default depth / 2")
    v.add_argument("--max-shift", type=int, default=2, help="grid shifts searched for the best agreement")


def _load(args: argparse.Namespace) -> tuple[GPT, torch.device]:
    device = resolve_device(args.device)
    return load_gpt(args, args.ckpt, device), device


def _check_index(args: argparse.Namespace, n: int) -> None:
    if not 0 <= args.index < n:
        raise ValueError(f"--index {args.index} out of range: {args.codes} has {n} images")


def run(args: argparse.Namespace) -> None:
    os.makedirs(args.out, exist_ok=True)
    {"attention": run_attention, "views": run_views}[args.what](args)


def run_attention(args: argparse.Namespace) -> None:
    model, device = _load(args)
    cfg = model.config
    meta = read_codes_meta(args.codes)
    grid = tuple(meta["grid"])
    T = grid[0] * grid[1]
    if T != cfg.block_size:
        raise ValueError(f"{args.codes} has {T} tokens per image but the model {cfg.block_size}")
    block = args.block or cfg.n_layer
    steps = args.steps or [min(s, T - 1) for s in default_steps(T, 4)]
    if any(not 1 <= s < T for s in steps):
        raise ValueError(f"attention steps must lie in [1, {T - 1}] (the query predicting that cell), got {steps}")
    codes, labels = first_view_codes(args.codes, view=args.view)
    _check_index(args, len(codes))

    n = min(max(args.num_images, 1), len(codes))  # the locality summary averages the first n images
    summary, count = mean_locality(
        model,
        codes[:n],
        labels[:n],
        block,
        grid,
        null_class=args.cond == "null",
        batch_size=args.batch_size,
        device=device,
    )
    summary.update(num_images=count, block=block, cond=args.cond, ckpt=os.path.abspath(args.ckpt))
    print(
        f"block {block}: neighbour mass {summary['neighbour_mass']:.3f} "
        f"(uniform {summary['uniform_neighbour_mass']:.3f}), class mass {summary['class_mass']:.3f} over {count} images"
    )

    x, y = codes[args.index : args.index + 1].to(device), labels[args.index : args.index + 1].to(device)
    cond = torch.full_like(y, cfg.null_class) if args.cond == "null" else y
    attn = attention_maps(model, x, cond, block)[0].cpu()  # (H, T, T)
    image = None
    if args.vq_ckpt:
        vq = VQModel.from_checkpoint(args.vq_ckpt, args.vq_model, trust=args.trust_checkpoint).to(device).eval()
        with torch.no_grad():
            image = to_uint8(vq.decode(x, grid=grid))[0]
    render_attention(
        attn,
        steps,
        grid,
        os.path.join(args.out, "attention.png"),
        image=image,
        per_head=args.per_head,
        title=f"block {block}, image {args.index} (label {int(y[0])}, cond {args.cond})",
    )
    summary.update(index=args.index, steps=steps)
    write_json_atomic(os.path.join(args.out, "attention.json"), summary)
    print(f"wrote attention.png, attention.json to {args.out}")


def run_views(args: argparse.Namespace) -> None:
    model, device = _load(args)
    cfg = model.config
    meta = read_codes_meta(args.codes)
    grid = tuple(meta["grid"])
    names = [meta["crop_names"][v % meta["crops_per_range"]] for v in (args.view_a, args.view_b)]
    codes_a, labels = first_view_codes(args.codes, view=args.view_a)
    codes_b, _ = first_view_codes(args.codes, view=args.view_b)
    _check_index(args, len(codes_a))
    n = min(max(args.num_images, 1), len(codes_a))
    # a flip mirrors the token grid: compare with the mirrored grid too when exactly one view is flipped
    one_flipped = names[0].startswith("flip") != names[1].startswith("flip")
    agreement = mean_token_agreement(codes_a[:n], codes_b[:n], grid, args.max_shift, mirror=one_flipped)
    layer = args.layer if args.layer is not None else cfg.n_layer // 2
    steps = args.steps or default_steps(cfg.block_size)
    extract = dict(steps=steps, layer=layer, batch_size=args.batch_size, device=device, progress=False)
    feats_a, _ = extract_step_features(model, codes_a[:n], labels=labels[:n], **extract)
    feats_b, _ = extract_step_features(model, codes_b[:n], labels=labels[:n], **extract)
    cosine = feature_cosine(feats_a, feats_b)

    i = args.index
    a, b = codes_a[i].view(grid).numpy(), codes_b[i].view(grid).numpy()
    agree_i, shift_i = token_agreement(a, b, args.max_shift)
    report = {
        "ckpt": os.path.abspath(args.ckpt),
        "codes": args.codes,
        "views": {"a": [args.view_a, names[0]], "b": [args.view_b, names[1]]},
        "num_images": n,
        "layer": layer,
        "max_shift": args.max_shift,
        **agreement,
        "feature_cosine": {str(s): c for s, c in cosine.items()},
        "image": {
            "index": i,
            "agreement_same_position": token_agreement(a, b)[0],
            "agreement_best_shift": agree_i,
            "best_shift": list(shift_i),
        },
    }
    print(
        f"views {names[0]} / {names[1]} over {n} images: token agreement {report['agreement_same_position']:.3f} "
        f"same position, {report['agreement_best_shift']:.3f} best shift (<= {args.max_shift})"
    )
    render_views(
        a,
        b,
        cosine,
        os.path.join(args.out, "views.png"),
        vocab_size=meta["vocab_size"],
        names=(f"{names[0]} (view {args.view_a})", f"{names[1]} (view {args.view_b})"),
        title=f"image {i}: agreement {report['image']['agreement_same_position']:.2f}, "
        f"best shift {agree_i:.2f} at {shift_i}; cosine over {n} images",
    )
    write_json_atomic(os.path.join(args.out, "views.json"), report)
    print(f"wrote views.png, views.json to {args.out}")
