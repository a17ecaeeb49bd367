"""Train a class-conditional GPT on extracted codes: the LlamaGen baseline or ST-AR.

    st-ar train --config demo-mnist-star
    st-ar train --config imagenet-b-star data.codes=/data/in256_codes optim.batch_size=512
    torchrun --nproc_per_node 8 -m st_ar.cli train --config imagenet-l-star data.codes=...

Settings are ``section.field=value`` (sections: model, data, objective, teacher, optim, train);
`--show` prints the resolved configuration and exits. Running the same command again resumes
from the run folder's last checkpoint.
"""

from __future__ import annotations

import argparse
import json

from ..config import PRESETS, apply_overrides, preset, to_dict

HELP = "train the baseline or ST-AR (resumes automatically)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("--config", default="debug", help=f"preset: {', '.join(PRESETS)}")
    p.add_argument("--show", action="store_true", help="print the resolved configuration and exit")
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="section.field=value",
        help="e.g. objective.mask_ratio=0.35 objective.view=false teacher.ema_decay=0.999",
    )


def run(args: argparse.Namespace) -> None:
    cfg = apply_overrides(preset(args.config), args.overrides)
    if args.show:
        print(json.dumps(to_dict(cfg), indent=2))
        return
    from ..train.loop import train  # torch-heavy imports only when training

    summary = train(cfg)
    state = "finished" if summary["finished"] else "stopped"
    losses = ", ".join(f"{k.split('/')[-1]} {v:.4f}" for k, v in summary["metrics"].items() if k.startswith("loss/"))
    print(f"{state} at step {summary['step']}: {losses}; checkpoint {summary['checkpoint']}")
