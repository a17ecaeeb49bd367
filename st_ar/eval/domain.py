"""A small CNN classifier per dataset, for metrics where InceptionV3 (ImageNet) features mean little.

    clf = DomainClassifier.load_or_train("mnist")     # trained once on the train split, then cached
    clf.class_accuracy(samples_uint8, labels)          # do class-conditional samples show their class?
    domain_fid(clf, samples_uint8, real_uint8)         # FID in the classifier's penultimate features

Images are 32x32: 28x28 MNIST / Fashion-MNIST are zero-padded by 2 pixels, other sizes are resized.
The trained weights live under $ST_AR_CACHE/domain (default ~/.cache/st-ar), keyed by dataset name,
split, image size, epochs and image count. On MNIST, 2 epochs reach about 99% test accuracy within a
minute or two on a laptop-class CPU.
"""

from __future__ import annotations

import hashlib
import os

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from ..data.datasets import cache_dir, open_dataset
from ..progress import progress_bar
from ..runfolder import atomic_write
from .metrics import feature_stats, frechet_distance

SIZE = 32
FEATURE_DIM = 128


class SmallCNN(nn.Module):
    """Three conv blocks and a 128-d penultimate layer; enough for digits and clothes at 32x32."""

    def __init__(self, num_classes: int):
        super().__init__()

        def block(c_in: int, c_out: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(), nn.MaxPool2d(2)
            )

        self.body = nn.Sequential(block(3, 16), block(16, 32), block(32, 64), nn.Flatten())
        self.penultimate = nn.Sequential(nn.Linear(64 * 4 * 4, FEATURE_DIM), nn.ReLU())
        self.head = nn.Linear(FEATURE_DIM, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.penultimate(self.body(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def to_input(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W[, C]) -> float (N, 3, 32, 32) in [-1, 1]; 28x28 is padded, other sizes resized."""
    x = torch.as_tensor(np.asarray(images))
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4:
        raise ValueError(f"expected uint8 images (N, H, W[, C]), got shape {tuple(x.shape)}")
    x = x.permute(0, 3, 1, 2).float() / 127.5 - 1
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    h, w = x.shape[-2:]
    if (h, w) == (28, 28):
        x = F.pad(x, (2, 2, 2, 2), value=-1.0)  # black border, as the digits' own background
    elif (h, w) != (SIZE, SIZE):
        x = F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", antialias=True, align_corners=False)
    return x


def dataset_arrays(name: str, split: str, max_images: int | None = None, seed: int = 0):
    """(uint8 (N, H, W, 3) images, int64 labels, num_classes) of a dataset, optionally a random subset."""
    ds = open_dataset(name, split)
    idx = np.arange(len(ds))
    if max_images is not None and max_images < len(ds):
        idx = np.sort(np.random.default_rng(seed).choice(len(ds), max_images, replace=False))
    images, labels = [], []
    for i in idx:
        img, y = ds[int(i)]
        if img.size != (28, 28):  # MNIST-like stays 28 (padded later); everything else becomes 32x32
            img = img.convert("RGB").resize((SIZE, SIZE), Image.BILINEAR)
        images.append(np.asarray(img))
        labels.append(y)
    return np.stack(images), np.asarray(labels, np.int64), ds.num_classes


class DomainClassifier:
    def __init__(self, model: SmallCNN, trained_now: bool = False):
        self.model = model.eval()
        self.trained_now = trained_now  # False when the weights came from the cache

    @classmethod
    def load_or_train(
        cls,
        dataset: str,
        split: str = "train",
        epochs: int = 2,
        max_images: int | None = None,
        batch_size: int = 64,
        seed: int = 0,
        progress: bool = True,
    ) -> DomainClassifier:
        path = cls.cache_path(dataset, split, epochs, max_images, seed)
        if os.path.isfile(path):
            state = torch.load(path, weights_only=True)
            model = SmallCNN(state["head.weight"].shape[0])
            model.load_state_dict(state)
            return cls(model)
        images, labels, num_classes = dataset_arrays(dataset, split, max_images, seed)
        model = train_classifier(
            to_input(images), torch.as_tensor(labels), num_classes, epochs, batch_size, seed, progress
        )
        atomic_write(path, lambda f: torch.save(model.state_dict(), f))  # never half a cache file
        return cls(model, trained_now=True)

    @staticmethod
    def cache_path(dataset: str, split: str, epochs: int, max_images: int | None, seed: int) -> str:
        # a folder dataset is keyed by its absolute path, MNIST-like names by name
        name = os.path.abspath(dataset) if os.path.isdir(dataset) else dataset.lower()
        key = hashlib.sha256(f"{name}|{split}|{SIZE}|{epochs}|{max_images}|{seed}".encode()).hexdigest()[:16]
        return os.path.join(cache_dir(), "domain", f"cnn-{key}.pt")

    @torch.inference_mode()
    def _run(self, images: np.ndarray, fn, batch_size: int = 500) -> torch.Tensor:
        return torch.cat([fn(to_input(images[i : i + batch_size])) for i in range(0, len(images), batch_size)])

    def features(self, images: np.ndarray) -> np.ndarray:
        """(N, 128) penultimate features of uint8 images."""
        return self._run(images, self.model.features).numpy()

    def predict(self, images: np.ndarray) -> np.ndarray:
        return self._run(images, self.model).argmax(1).numpy()

    def class_accuracy(self, images: np.ndarray, labels: np.ndarray) -> float:
        """Share of images the classifier assigns to the class they were generated (or labelled) as."""
        labels = np.asarray(labels)
        if len(labels) != len(images):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        return float((self.predict(images) == labels).mean())


def train_classifier(
    x: torch.Tensor, y: torch.Tensor, num_classes: int, epochs: int, batch_size: int, seed: int, progress: bool
) -> SmallCNN:
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = SmallCNN(num_classes)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    steps = epochs * -(-len(x) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    model.train()
    with progress_bar(total=steps, desc="training domain classifier", disable=not progress) as bar:
        for _ in range(epochs):
            order = torch.randperm(len(x), generator=gen)
            for i in range(0, len(x), batch_size):
                b = order[i : i + batch_size]
                loss = F.cross_entropy(model(x[b]), y[b])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                bar.update()
    return model.eval()


def domain_fid(clf: DomainClassifier, samples: np.ndarray, reference_images: np.ndarray) -> float:
    """Fréchet distance between samples and real images in the classifier's penultimate features."""
    return domain_fid_to(clf, samples, feature_stats(clf.features(reference_images)))


def domain_fid_to(clf: DomainClassifier, samples: np.ndarray, reference: tuple[np.ndarray, np.ndarray]) -> float:
    """``domain_fid`` against the (mu, sigma) of the real images' features, computed once by the caller."""
    return frechet_distance(*feature_stats(clf.features(samples)), *reference)


def evaluate_domain(
    samples: str,
    dataset: str,
    labels: np.ndarray | None = None,
    *,
    per_class: int | None = None,
    ref_split: str = "test",
    epochs: int = 2,
    train_images: int | None = None,
) -> dict:
    """Class accuracy and domain FID of the samples (an .npz or a folder) against ``dataset``'s ``ref_split``
    (``st-ar eval domain``). The class of each sample: ``labels``, else ``per_class`` (samples written that
    many at a time in class order), else the 'labels' stored in the .npz. The classifier trains on a random
    ``train_images`` of the train split for ``epochs`` (cached per setting)."""
    from .samples import as_array, load_samples, per_class_labels, stored_labels

    images = as_array(load_samples(samples))
    if labels is None:
        labels = per_class_labels(len(images), per_class) if per_class is not None else stored_labels(samples)
    clf = DomainClassifier.load_or_train(dataset, epochs=epochs, max_images=train_images)
    real, real_labels, _ = dataset_arrays(dataset, ref_split)
    return {
        "samples": samples,
        "num_samples": len(images),
        "dataset": dataset,
        "class_accuracy": clf.class_accuracy(images, labels),
        "real_class_accuracy": clf.class_accuracy(real, real_labels),
        "domain_fid": domain_fid(clf, images, real),
    }
