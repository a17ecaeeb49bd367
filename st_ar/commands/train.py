"""Train a class-conditional GPT on extracted codes: the LlamaGen baseline or ST-AR.

    st-ar train --config demo-mnist-star
    st-ar train --config imagenet-b-star data.codes=/data/in256_codes optim.batch_size=512
    torchrun --nproc_per_node 8 -m st_ar.cli train --config imagenet-l-star data.codes=...

Settings are ``section.field=value`` (sections: model, data, objective, teacher, optim, train);
`--show` prints the resolved configuration and exits. Running the same command again resumes
from the run folder's last checkpoint; on a finished run it says so and trains nothing.
"""

from __future__ import annotations

import argparse
import json
import os

from ..config import PRESETS, apply_overrides, preset, to_dict
from ..distributed import print0

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
    # under torchrun every rank returns the summary; rank 0 alone reports it
    if summary["already_finished"]:
        exports = [p for p in (os.path.join(cfg.train.out_dir, n) for n in ("model.pt", "ema.pt")) if os.path.exists(p)]
        print0(
            f"already finished at step {summary['step']}; nothing to do. checkpoint {summary['checkpoint']}; "
            f"exports {', '.join(exports)}"
        )
        return
    state = "finished" if summary["finished"] else "stopped"
    losses = ", ".join(f"{k.split('/')[-1]} {v:.4f}" for k, v in summary["metrics"].items() if k.startswith("loss/"))
    print0(f"{state} at step {summary['step']}: {losses}; checkpoint {summary['checkpoint']}")
