"""Evaluate generated samples.

    st-ar eval fid --samples DIR/samples.npz --ref VIRTUAL_imagenet256_labeled.npz --out metrics.json
    st-ar eval fid --samples DIR/samples.npz --ref mnist --ref-split test
    st-ar eval domain --samples DIR/samples.npz --per-class 100 --dataset mnist

``fid``: FID, sFID, KID, improved precision/recall (and IS when the network has logits) in InceptionV3
features. ``domain``: class accuracy and FID in the features of a small CNN trained on the dataset.
Samples are an .npz (uint8 N x H x W x 3 under arr_0, as ``st-ar sample`` writes) or a folder of PNG/JPEG.
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
from PIL import Image

from ..data.datasets import IMAGE_EXTENSIONS, open_dataset
from ..distributed import cleanup_distributed, init_distributed, print0
from . import probe

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
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, ...")
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


# --------------------------------------------------------------------------------------------------
# Loading images
# --------------------------------------------------------------------------------------------------


class FolderImages:
    """Sorted PNG/JPEG files of a folder (recursive), decoded lazily to uint8 RGB arrays."""

    def __init__(self, folder: str):
        self.paths = sorted(
            os.path.join(d, f) for d, _, fs in os.walk(folder) for f in fs if f.lower().endswith(IMAGE_EXTENSIONS)
        )
        if not self.paths:
            raise FileNotFoundError(f"no PNG/JPEG images in {folder}")

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> np.ndarray:
        with Image.open(self.paths[i]) as img:
            return np.asarray(img.convert("RGB"))


class DatasetImages:
    """An st_ar dataset's images as uint8 RGB arrays (MNIST's 28x28 grayscale becomes 28x28x3)."""

    def __init__(self, name: str, split: str):
        self.ds = open_dataset(name, split)

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> np.ndarray:
        return np.asarray(self.ds[i][0].convert("RGB"))


def load_samples(path: str):
    """uint8 images of an .npz (arr_0) or a folder; indexable."""
    if os.path.isdir(path):
        return FolderImages(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no samples at {path}")
    with np.load(path) as z:
        if "arr_0" not in z:
            raise ValueError(f"{path} has no arr_0 images (keys: {', '.join(z.files)})")
        images = z["arr_0"]
    if images.dtype != np.uint8 or images.ndim not in (3, 4):
        raise ValueError(f"{path}: expected uint8 N x H x W [x C] images, got {images.dtype} {images.shape}")
    return images[..., None] if images.ndim == 3 else images


def _subset_tag(n: int | None) -> str:
    return "all" if n is None else f"random{n}"


def _subset(images, n: int | None):
    """A fixed random n of ``images`` (kept in order): sample files are often written class by class,
    so the first n would cover only the first classes."""
    if n is None or n >= len(images):
        return images
    if n < 1:
        raise ValueError(f"--max-samples must be >= 1, got {n}")
    keep = np.sort(np.random.default_rng(0).choice(len(images), n, replace=False))
    return images[keep] if isinstance(images, np.ndarray) else [images[int(i)] for i in keep]


# --------------------------------------------------------------------------------------------------
# st-ar eval fid
# --------------------------------------------------------------------------------------------------


def _reference(args, model, info) -> tuple[dict[str, np.ndarray], str]:
    """Reference statistics (features, mu, sigma, ...) and a description of where they came from."""
    from ..eval.inception import file_identity, load_or_compute_reference

    ref = args.ref
    if os.path.isfile(ref) and ref.endswith(".npz"):
        with np.load(ref) as z:
            keys = set(z.files)
            if "arr_0" not in keys:
                if not {"mu", "sigma"} <= keys:
                    raise ValueError(f"{ref} holds neither arr_0 images nor mu/sigma (keys: {', '.join(z.files)})")
                stats = {"mu": z["mu"], "sigma": z["sigma"]}
                if {"mu_s", "sigma_s"} <= keys:
                    stats.update(mu_s=z["mu_s"], sigma_s=z["sigma_s"])
                return stats, "precomputed mu/sigma"
        source_id = f"npz:{file_identity(ref)}:{_subset_tag(args.max_samples)}"

        def images():
            return _subset(load_samples(ref), args.max_samples)

    else:
        source = file_identity(ref) if os.path.isdir(ref) else ref.lower()
        source_id = f"dataset:{source}:{args.ref_split}:{_subset_tag(args.max_samples)}"

        def images():
            return _subset(DatasetImages(ref, args.ref_split), args.max_samples)

    if args.no_cache:
        source_id += f":nocache{os.getpid()}"
    stats, cached = load_or_compute_reference(source_id, images, model, args.batch_size, info)
    return stats, "cached reference statistics" if cached else "reference images"


def run_fid(args: argparse.Namespace) -> None:
    from ..eval.inception import InceptionFeatures, compute_features
    from ..eval.metrics import feature_stats, frechet_distance, inception_score, kid, precision_recall

    info = init_distributed(args.device)
    try:
        model = InceptionFeatures(args.inception, device=info.device)
        samples = _subset(load_samples(args.samples), args.max_samples)
        ref, ref_from = _reference(args, model, info)
        feats = compute_features(model, samples, args.batch_size, info, desc="samples")
    finally:
        cleanup_distributed()
    if not info.is_main:
        return
    results: dict[str, object] = {"samples": args.samples, "num_samples": len(samples), "ref": args.ref}
    notes: dict[str, str] = {}
    mu, sigma = feature_stats(feats["pool"])
    results["fid"] = frechet_distance(mu, sigma, ref["mu"], ref["sigma"])
    if "spatial" in feats and "mu_s" in ref:
        results["sfid"] = frechet_distance(*feature_stats(feats["spatial"]), ref["mu_s"], ref["sigma_s"])
    elif "spatial" not in feats:
        notes["sfid"] = "the network exposes no spatial features; pass --inception PATH to a network that does"
    else:
        notes["sfid"] = "the reference has no spatial statistics (mu_s/sigma_s) or images"
    if "logits" in feats:
        probs = np.exp(feats["logits"] - feats["logits"].max(1, keepdims=True))
        results["inception_score"] = inception_score(probs / probs.sum(1, keepdims=True))[0]
    else:
        notes["inception_score"] = "the network has no logits (the bundled one ends at pool_3); pass --inception PATH"
    if "features" in ref:
        results["kid"], results["kid_std"] = kid(ref["features"], feats["pool"])
        results["precision"], results["recall"] = precision_recall(ref["features"], feats["pool"])
    else:
        for name in ("kid", "precision", "recall"):
            notes[name] = "the reference holds only mu/sigma; KID and precision/recall need reference images"
    results["not_computed"] = notes

    print(f"samples: {len(samples)} from {args.samples}; reference: {args.ref} ({ref_from})")
    labels = {"fid": "FID", "sfid": "sFID", "inception_score": "IS", "kid": "KID", "precision": "precision"}
    labels["recall"] = "recall"
    for key, label in labels.items():
        if key in results:
            extra = f" ± {results['kid_std']:.5f}" if key == "kid" else ""
            print(f"{label}: {results[key]:.5f}{extra}" if key == "kid" else f"{label}: {results[key]:.4f}")
        else:
            print(f"{label}: not computed ({notes[key]})")
    _write_json(args.out, results)


# --------------------------------------------------------------------------------------------------
# st-ar eval domain
# --------------------------------------------------------------------------------------------------


def run_domain(args: argparse.Namespace) -> None:
    from ..eval.domain import DomainClassifier, dataset_arrays, domain_fid

    samples = load_samples(args.samples)
    samples = samples if isinstance(samples, np.ndarray) else np.stack([samples[i] for i in range(len(samples))])
    if args.per_class is not None:
        if args.per_class < 1 or len(samples) % args.per_class:
            raise ValueError(f"{len(samples)} samples are not a whole number of groups of --per-class {args.per_class}")
        labels = np.repeat(np.arange(len(samples) // args.per_class), args.per_class)
    elif args.labels:
        labels = np.load(args.labels).astype(np.int64).reshape(-1)
    else:
        labels = _stored_labels(args.samples)
    clf = DomainClassifier.load_or_train(args.dataset, epochs=args.epochs, max_images=args.train_images)
    real, real_labels, _ = dataset_arrays(args.dataset, args.ref_split)
    results = {
        "samples": args.samples,
        "num_samples": len(samples),
        "dataset": args.dataset,
        "class_accuracy": clf.class_accuracy(samples, labels),
        "real_class_accuracy": clf.class_accuracy(real, real_labels),
        "domain_fid": domain_fid(clf, samples, real),
    }
    print(f"class accuracy: {results['class_accuracy']:.4f} (real {args.ref_split} images: ", end="")
    print(f"{results['real_class_accuracy']:.4f})")
    print(f"domain FID vs {args.dataset} {args.ref_split}: {results['domain_fid']:.4f}")
    _write_json(args.out, results)


def _stored_labels(samples: str) -> np.ndarray:
    """The class of every sample as `st-ar sample` stores it in samples.npz ('labels')."""
    if os.path.isfile(samples):
        with np.load(samples) as z:
            if "labels" in z.files:
                return z["labels"].astype(np.int64).reshape(-1)
    raise ValueError(f"{samples} stores no 'labels': pass --per-class N or --labels PATH")


def _write_json(path: str | None, results: dict) -> None:
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(results, f, indent=2)
        print0(f"wrote {path}")
