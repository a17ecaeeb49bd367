"""The image sets that evaluation reads: sample files, image folders and datasets, as uint8 arrays.

    images = load_samples("samples/samples.npz")   # (N, H, W, C) uint8, or an indexable folder
    images = random_subset(images, 5000)           # a fixed random 5000, kept in file order

A sample file is an .npz with uint8 N x H x W [x C] images under "arr_0" (the ADM evaluator's format, as
``st-ar sample`` writes it) and, optionally, the class of each sample under "labels".
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

from ..data.datasets import IMAGE_EXTENSIONS, open_dataset


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
    """uint8 images of an .npz (arr_0; N x H x W x C, a missing channel axis added) or a folder; indexable."""
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


def as_array(images) -> np.ndarray:
    """All of ``images`` (an array, or an indexable folder or dataset) as one (N, H, W, C) array."""
    return images if isinstance(images, np.ndarray) else np.stack([images[i] for i in range(len(images))])


def stored_labels(samples: str) -> np.ndarray:
    """The class of every sample as ``st-ar sample`` stores it in samples.npz ('labels')."""
    if os.path.isfile(samples):
        with np.load(samples) as z:
            if "labels" in z.files:
                return z["labels"].astype(np.int64).reshape(-1)
    raise ValueError(f"{samples} stores no 'labels': pass --per-class N or --labels PATH")


def per_class_labels(num_samples: int, per_class: int) -> np.ndarray:
    """Labels of samples written ``per_class`` at a time in class order: 0, 0, ..., 1, 1, ..."""
    if per_class < 1 or num_samples % per_class:
        raise ValueError(f"{num_samples} samples are not a whole number of groups of --per-class {per_class}")
    return np.repeat(np.arange(num_samples // per_class), per_class)


def subset_tag(n: int | None) -> str:
    """How ``random_subset(images, n)`` picks, for cache keys."""
    return "all" if n is None else f"random{n}"


def random_subset(images, n: int | None):
    """A fixed random n of ``images`` (kept in order): sample files are often written class by class,
    so the first n would cover only the first classes. None, or n of at least len(images): all of them."""
    if n is None or n >= len(images):
        return images
    if n < 1:
        raise ValueError(f"max_samples must be >= 1, got {n}")
    keep = np.sort(np.random.default_rng(0).choice(len(images), n, replace=False))
    return images[keep] if isinstance(images, np.ndarray) else [images[int(i)] for i in keep]
