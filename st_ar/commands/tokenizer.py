"""Train or evaluate a VQ image tokenizer.

    st-ar tokenizer train --out runs/vq-mnist dataset=mnist        # the CPU demo: about 4 minutes
    st-ar tokenizer train --out runs/vq-mnist steps=600            # continue the same run to step 600
    torchrun --nproc-per-node 4 -m st_ar.cli tokenizer train --out runs/vq-in dataset=/data/imagenet image_size=256 ...
    st-ar tokenizer eval --ckpt runs/vq-mnist/tokenizer.pt --dataset mnist

Settings are ``field=value`` (every TokenizerTrainConfig field, st_ar/tokenizer/train.py; JSON for
vq_args), as `st-ar train` takes ``section.field=value``. A folder that already holds a run
(checkpoints/last.pt) resumes from it: its stored settings are the starting point, so the settings
given again, or none, continue it; only steps, eval_every, eval_samples, save_every, log_every,
num_workers and device may change, and it needs as many processes as before.

A run folder holds config.json, checkpoints/last.pt, tokenizer.pt (load it with
VQModel.from_checkpoint(path)), eval.json, recon/*.png, metrics.jsonl and tensorboard/.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

from torch.utils.data import Subset

from ..data.datasets import open_dataset
from ..distributed import resolve_device
from ..models.vq import VQ_PRESETS, VQModel
from ..settings import apply_settings
from ..tokenizer.train import (
    TokenizerImages,
    TokenizerTrainConfig,
    evaluate,
    stored_config,
    train,
)
from . import add_device_argument, add_trust_argument

HELP = "train or evaluate a VQ image tokenizer"


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    _add_train(
        sub.add_parser(
            "train",
            help="train a tokenizer (resumes automatically)",
            description=__doc__,
            epilog=_settings_help(),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
    )
    _add_eval(sub.add_parser("eval", help="held-out PSNR, codebook usage and perplexity of a tokenizer file"))


def _add_train(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="run folder (created; a folder holding a run resumes it)")
    p.add_argument("--show", action="store_true", help="print the resolved settings and exit")
    p.add_argument(
        "--resume",
        action="store_true",
        help="insist on continuing: an error when --out holds no run (continuing is automatic anyway)",
    )
    p.add_argument("settings", nargs="*", metavar="field=value", help="e.g. dataset=mnist steps=600 lr=1e-3")


def _settings_help() -> str:
    defaults = TokenizerTrainConfig().to_dict()
    lines = [f"  {name}={_shown(value)}" for name, value in defaults.items() if name != "out"]
    return f"settings (field=value) and their defaults; presets: {', '.join(VQ_PRESETS)}\n" + "\n".join(lines)


def _shown(value) -> str:
    """A default as it would be typed: none, true, 1e-3, mnist, {"ch": 64}."""
    return value if isinstance(value, str) else json.dumps(value).replace("null", "none")


def _add_eval(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt", required=True, help="tokenizer file: ours (tokenizer.pt), or LlamaGen's with --vq-model")
    p.add_argument("--vq-model", help="VQ preset for files without a stored config (LlamaGen's)")
    p.add_argument("--dataset", required=True, help="mnist, fashion-mnist, or a folder of class subfolders")
    p.add_argument("--data-root", help="folder holding the mnist / fashion-mnist files, if not found")
    p.add_argument("--split", default="test", help="split to evaluate (default: test)")
    p.add_argument("--image-size", type=int, default=32, help="as in training (default: 32)")
    p.add_argument("--limit", type=int, default=0, help="first N images only; 0 = all")
    p.add_argument("--batch-size", type=int, default=128)
    add_device_argument(p)
    add_trust_argument(p)
    p.add_argument("--json", metavar="PATH", help="also write the metrics here")


def run(args: argparse.Namespace) -> None:
    if args.action == "train":
        _run_train(args)
    else:
        _run_eval(args)


def config_from_args(args: argparse.Namespace) -> TokenizerTrainConfig:
    """The run's config: the run folder's stored one when it holds a run (else the defaults), with
    the settings given now on top."""
    if any(item.lstrip("-").partition("=")[0] == "out" for item in args.settings):
        raise ValueError("the run folder is --out, not a setting")
    stored = stored_config(args.out)
    if args.resume and stored is None:
        raise FileNotFoundError(f"nothing to resume: {args.out} holds no tokenizer run (checkpoints/last.pt)")
    base = TokenizerTrainConfig.from_dict(stored) if stored is not None else TokenizerTrainConfig()
    return apply_settings(dataclasses.replace(base, out=args.out), args.settings, "tokenizer setting")


def _run_train(args: argparse.Namespace) -> None:
    config = config_from_args(args)
    if args.show:
        print(json.dumps(config.to_dict(), indent=2))
        return
    train(config)  # a NonFiniteLossError is reported by st_ar.cli (exit status 3)


def _run_eval(args: argparse.Namespace) -> None:
    device = resolve_device(args.device)
    model = VQModel.from_checkpoint(args.ckpt, args.vq_model, trust=args.trust_checkpoint).to(device)
    base = open_dataset(args.dataset, args.split, root=args.data_root)
    images = TokenizerImages(base, args.image_size)
    if 0 < args.limit < len(images):
        images = Subset(images, range(args.limit))
    start = time.perf_counter()
    metrics = evaluate(model, images, batch_size=args.batch_size, device=device)
    metrics.update({"ckpt": os.path.abspath(args.ckpt), "dataset": args.dataset, "split": args.split})
    print(
        f"{metrics['images']} images in {time.perf_counter() - start:.1f} s: PSNR {metrics['psnr']:.2f} dB "
        f"(of mean MSE {metrics['psnr_of_mean_mse']:.2f} dB), codebook usage {metrics['codebook_usage']:.1%} "
        f"({metrics['codes_used']}/{metrics['codebook_size']}), perplexity {metrics['perplexity']:.1f}"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(metrics, f, indent=2)
