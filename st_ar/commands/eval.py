"""Evaluate generated samples.

    st-ar eval fid --samples DIR/samples.npz --ref VIRTUAL_imagenet256_labeled.npz --out metrics.json
    st-ar eval fid --samples DIR/samples.npz --ref mnist --ref-split test
    st-ar eval domain --samples DIR/samples.npz --per-class 100 --dataset mnist

``fid``: FID, sFID, KID, improved precision/recall (and IS when the network has logits) in InceptionV3
features. ``domain``: class accuracy and FID in the features of a small CNN trained on the dataset.
Samples are an .npz (uint8 N x H x W x 3 under arr_0, as ``st-ar sample`` writes) or a folder of PNG/JPEG.
The metrics are st_ar/eval/fid.py's and st_ar/eval/domain.py's; this module reads the arguments and prints.
"""

from __future__ import annotations

import argparse

import numpy as np

from ..distributed import cleanup_distributed, init_distributed, print0
from ..runfolder import write_json_atomic
from . import add_device_argument, probe

HELP = "evaluate samples: FID/KID/precision/recall, or a domain classifier's accuracy"


def add_fid_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--samples", required=True, help=".npz (arr_0: uint8 N x H x W x 3) or a folder of PNG/JPEG")
    p.add_argument(
        "--ref", required=True, help="ADM reference batch .npz (arr_0 and/or mu, sigma), dataset name, or folder"
    )
    p.add_argument("--ref-split", default="test", help="split of a dataset --ref (default test)")
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--inception", metavar="PATH", help="TorchScript network instead of the bundled InceptionV3")
    p.add_argument(
        "--max-samples",
        type=int,
        metavar="N",
        help="use a random N of the samples (and of the references); the same N for the same file",
    )
    add_device_argument(p)
    p.add_argument("--no-cache", action="store_true", help="recompute the reference statistics")
    p.add_argument("--out", help="write the metrics as JSON here")


def add_domain_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--samples", required=True, help=".npz (arr_0: uint8 N x H x W x C) or a folder of PNG/JPEG")
    labels = p.add_mutually_exclusive_group()
    labels.add_argument("--per-class", type=int, metavar="N", help="samples are N per class, in class order")
    labels.add_argument(
        "--labels", metavar="PATH", help=".npy of int class labels, one per sample (default: the .npz's 'labels')"
    )
    p.add_argument("--dataset", required=True, help="mnist, fashion-mnist, or an image folder")
    p.add_argument("--ref-split", default="test", help="real images the domain FID compares with")
    p.add_argument("--epochs", type=int, default=2, help="classifier training epochs (cached per setting)")
    p.add_argument(
        "--train-images", type=int, metavar="N", help="train the classifier on a random N of the train split"
    )
    p.add_argument("--out", help="write the metrics as JSON here")


# name -> (add_arguments, run, help); `st-ar eval probe` is meant to be added here
SUBCOMMANDS = {
    "fid": (add_fid_arguments, lambda args: run_fid(args), "FID, sFID, KID, precision/recall in InceptionV3 features"),
    "domain": (add_domain_arguments, lambda args: run_domain(args), "class accuracy and FID of a small dataset CNN"),
    "probe": (probe.add_arguments, probe.run, probe.HELP),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="eval_command", required=True, metavar="METRIC")
    for name, (add, _, help_text) in SUBCOMMANDS.items():
        add(sub.add_parser(name, help=help_text, description=help_text))


def run(args: argparse.Namespace) -> None:
    SUBCOMMANDS[args.eval_command][1](args)


def run_fid(args: argparse.Namespace) -> None:
    from ..eval.fid import evaluate_fid

    if args.max_samples is not None and args.max_samples < 1:
        raise ValueError(f"--max-samples must be >= 1, got {args.max_samples}")
    info = init_distributed(args.device)
    try:
        fid = evaluate_fid(
            args.samples,
            args.ref,
            ref_split=args.ref_split,
            max_samples=args.max_samples,
            batch_size=args.batch_size,
            inception=args.inception,
            info=info,
            cache=not args.no_cache,
        )
    finally:
        cleanup_distributed()
    if fid is None:  # not rank 0
        return
    results, notes = fid.results, fid.results["not_computed"]
    print(f"samples: {results['num_samples']} from {args.samples}; reference: {args.ref} ({fid.reference})")
    labels = {"fid": "FID", "sfid": "sFID", "inception_score": "IS", "kid": "KID", "precision": "precision"}
    labels["recall"] = "recall"
    for key, label in labels.items():
        if key in results:
            extra = f" ± {results['kid_std']:.5f}" if key == "kid" else ""
            print(f"{label}: {results[key]:.5f}{extra}" if key == "kid" else f"{label}: {results[key]:.4f}")
        else:
            print(f"{label}: not computed ({notes[key]})")
    _write_json(args.out, results)


def run_domain(args: argparse.Namespace) -> None:
    from ..eval.domain import evaluate_domain

    labels = np.load(args.labels).astype(np.int64).reshape(-1) if args.labels else None
    results = evaluate_domain(
        args.samples,
        args.dataset,
        labels,
        per_class=args.per_class,
        ref_split=args.ref_split,
        epochs=args.epochs,
        train_images=args.train_images,
    )
    print(f"class accuracy: {results['class_accuracy']:.4f} (real {args.ref_split} images: ", end="")
    print(f"{results['real_class_accuracy']:.4f})")
    print(f"domain FID vs {args.dataset} {args.ref_split}: {results['domain_fid']:.4f}")
    _write_json(args.out, results)


def _write_json(path: str | None, results: dict) -> None:
    if path:
        write_json_atomic(path, results)
        print0(f"wrote {path}")
