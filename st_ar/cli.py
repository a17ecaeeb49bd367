"""The ``st-ar`` command: one subcommand per task, each defined in st_ar/commands/."""

from __future__ import annotations

import argparse
import sys

from .commands import demo, extract, sample, tokenizer, train, viz
from .commands import eval as eval_cmd
from .models.loading import CheckpointError
from .runfolder import NoSpaceError, describe_os_error
from .train import NonFiniteLoss

COMMANDS = {
    "sample": sample,
    "extract": extract,
    "train": train,
    "tokenizer": tokenizer,
    "viz": viz,
    "eval": eval_cmd,
    "demo": demo,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="st-ar", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module in COMMANDS.items():
        module.add_arguments(sub.add_parser(name, help=module.HELP, description=module.__doc__))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        COMMANDS[args.command].run(args)
    except (CheckpointError, ValueError, FileNotFoundError, NotImplementedError, NoSpaceError) as e:
        # bad input or a full disk: say what is wrong and what to do, without a stack trace from deep inside torch
        print(f"st-ar {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        # the file system said no (full disk, permissions, a file where a folder should be)
        where = f"{e.filename}: " if e.filename else ""
        print(f"st-ar {args.command}: error: {where}{describe_os_error(e)}", file=sys.stderr)
        return 2
    except NonFiniteLoss as e:  # training stopped on NaN; the message says what was kept
        print(f"st-ar {args.command}: error: {e}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print(f"st-ar {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
