"""The end-to-end demo on MNIST (or Fashion-MNIST), offline, on a CPU: `make demo` runs this.

    st-ar demo                                  # runs/demo/mnist (see docs/demo.md for timings)
    st-ar demo --dataset fashion-mnist          # runs/demo/fashion-mnist
    st-ar demo --size toy --out /tmp/toy        # every stage at toy size, a minute
    st-ar demo --set steps=1200 --set cfg_scale=1.5

Trains a VQ tokenizer, tokenizes a subset of the images, trains a LlamaGen baseline and an ST-AR
model with the same budget, samples class-conditional grids from both, evaluates them (class
accuracy and domain FID with a small CNN, Inception FID, linear probe) and writes OUT/report.md with
its figures. Running it again reuses every finished stage; see st_ar/demo.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os

from ..settings import parse_settings

HELP = "the end-to-end demo: tokenizer, baseline and ST-AR, samples, metrics, report"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("--out", default=None, help="run folder (default runs/demo/DATASET)")
    p.add_argument("--dataset", default=None, help="mnist (default) or fashion-mnist")
    p.add_argument("--size", default="full", help="full (the demo) or toy (seconds; checks the pipeline)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="change one DemoConfig field (st_ar/demo.py), e.g. steps=1200; JSON for dicts, a JSON list or one "
        "value for lists (the shared settings syntax, st_ar/settings.py)",
    )
    p.add_argument("--show", action="store_true", help="print the resolved settings and exit")


def run(args: argparse.Namespace) -> None:
    from ..demo import DemoConfig, demo_config, run_demo

    changes = parse_settings(DemoConfig, args.set, "demo setting")
    if args.dataset:
        changes["dataset"] = args.dataset
    cfg = demo_config(args.size, **changes)
    if args.show:
        print(json.dumps(dataclasses.asdict(cfg), indent=2))
        return
    records = run_demo(cfg, args.out or os.path.join("runs", "demo", cfg.dataset))
    print(f"report: {records['report']['result']['path']}")
