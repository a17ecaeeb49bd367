"""Linear probe of per-step GPT features (null-class condition, first crop of each image).

For each checkpoint, features of one block (default: the middle one) are taken at evenly spaced steps
on the train and test extraction folders, and a BatchNorm + Linear head is trained per step.
Writes DIR/probe.json (accuracy per model per step) and DIR/probe.png (accuracy vs step, one line
per model, so a baseline and an ST-AR model sit on one plot).
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from ..distributed import resolve_device
from ..eval.probe import plot_probe, probe_curve
from ..runfolder import write_json_atomic
from . import add_device_argument, add_gpt_arguments, add_precision_argument, add_trust_argument, int_list, load_gpt

HELP = "linear probe of per-step features (understanding)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_gpt_arguments(p, several=True)  # --model and --model-args apply to every --ckpt
    p.add_argument("--label", action="append", help="name of each --ckpt in the plot (default: file name)")
    p.add_argument("--train-codes", required=True, help="extraction folder the probe is trained on")
    p.add_argument("--test-codes", required=True, help="extraction folder the probe is evaluated on")
    p.add_argument("--layer", type=int, help="block whose output is probed (1-based); default depth / 2")
    p.add_argument("--steps", type=int_list, help="comma-separated steps; default 8 evenly spaced, e.g. 32,...,256")
    p.add_argument("--epochs", type=int, default=20, help="probe epochs (MAE: 90)")
    p.add_argument("--lr", type=float, default=0.1, help="SGD learning rate (momentum 0.9, cosine schedule)")
    p.add_argument("--probe-batch-size", type=int, default=256)
    p.add_argument("--max-train", type=int, help="use only the first N training images (features are kept in RAM)")
    p.add_argument("--max-test", type=int, help="use only the first N test images")
    p.add_argument("--batch-size", type=int, default=64, help="batch size of the feature extraction")
    p.add_argument("--seed", type=int, default=0)
    add_device_argument(p)
    add_precision_argument(p)
    add_trust_argument(p)
    p.add_argument("--out", required=True, help="output folder")


def run(args: argparse.Namespace) -> None:
    labels = args.label or []
    if len(labels) > len(args.ckpt):
        raise ValueError(f"{len(labels)} --label for {len(args.ckpt)} --ckpt")
    labels = labels + [os.path.splitext(os.path.basename(c))[0] for c in args.ckpt[len(labels) :]]
    if len(set(labels)) != len(labels):
        raise ValueError(f"labels must differ (pass --label per --ckpt): {labels}")
    device = resolve_device(args.device)
    os.makedirs(args.out, exist_ok=True)

    report = {"train_codes": args.train_codes, "test_codes": args.test_codes, "epochs": args.epochs, "models": {}}
    curves = {}
    for label, ckpt in zip(labels, args.ckpt):
        start = time.perf_counter()
        model = load_gpt(args, ckpt, device)
        layer = args.layer if args.layer is not None else model.config.n_layer // 2
        curve = probe_curve(
            model,
            args.train_codes,
            args.test_codes,
            layer=layer,
            steps=args.steps,
            max_train=args.max_train,
            max_test=args.max_test,
            batch_size=args.batch_size,
            epochs=args.epochs,
            lr=args.lr,
            probe_batch_size=args.probe_batch_size,
            seed=args.seed,
            device=device,
        )
        del model
        acc = curve.accuracy
        for s, a in acc.items():
            print(f"{label}: layer {layer} step {s}: top-1 {100 * a:.2f}%")
        curves[label] = acc
        report["models"][label] = {
            "ckpt": os.path.abspath(ckpt),
            "layer": layer,
            "num_train": curve.num_train,
            "num_test": curve.num_test,
            "accuracy": {str(s): a for s, a in acc.items()},  # JSON keys are strings
            "seconds": round(time.perf_counter() - start, 1),
        }
        if device.type == "cuda":
            torch.cuda.empty_cache()

    write_json_atomic(os.path.join(args.out, "probe.json"), report)
    layers = sorted({m["layer"] for m in report["models"].values()})
    plot_probe(curves, os.path.join(args.out, "probe.png"), title=f"linear probe, layer {', '.join(map(str, layers))}")
    print(f"wrote probe.json, probe.png to {args.out}")
