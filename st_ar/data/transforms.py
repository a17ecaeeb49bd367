"""Image transforms without torchvision: RGB conversion, tensors in [-1, 1], padding to the tokenizer's
grid, the ADM centre crop and the ten crops that code extraction encodes.

All geometry works on PIL images, so the crops fed to the tokenizer are exactly the pixels a reader
of this file would cut by hand (tests check them against numpy slicing).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image

# Order of the crops returned by ten_crop / five_crop; meta.json of an extraction records it.
FIVE_CROP_NAMES = ("tl", "tr", "bl", "br", "center")
TEN_CROP_NAMES = FIVE_CROP_NAMES + tuple(f"flip_{n}" for n in FIVE_CROP_NAMES)
CROP_SETS = {"ten": TEN_CROP_NAMES, "five": FIVE_CROP_NAMES, "center": ("center",)}


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode (L, P, RGBA, CMYK, I;16, ...) -> RGB; grayscale is copied to the three channels."""
    return img if img.mode == "RGB" else img.convert("RGB")


def uint8_to_unit(x: torch.Tensor) -> torch.Tensor:
    """uint8 pixels -> float32 in [-1, 1] (0 -> -1, 255 -> 1). The one formula used everywhere, so an
    image tokenized during extraction and the same image tokenized by hand get bit-identical inputs."""
    return x.float() / 127.5 - 1.0


def image_to_tensor(img: Image.Image) -> torch.Tensor:
    """PIL image -> (3, H, W) float32 in [-1, 1], the tokenizer's input range."""
    arr = np.asarray(to_rgb(img))  # (H, W, 3) uint8
    return uint8_to_unit(torch.from_numpy(arr.copy()).permute(2, 0, 1))


def fit_to_multiple(img: Image.Image, multiple: int, mode: str = "pad", fill: int = 0) -> Image.Image:
    """Make both sides a multiple of ``multiple`` (the tokenizer's downsample factor).

    "pad" centres the image on a ``fill`` background (MNIST 28x28 -> 32x32 with a 2-pixel black border,
    which is the digits' own background; no pixel is resampled). "resize" scales each side to the
    nearest multiple (at least one) with bicubic resampling.
    """
    if multiple < 1:
        raise ValueError(f"multiple must be >= 1, got {multiple}")
    w, h = img.size
    if mode == "pad":
        new_w, new_h = math.ceil(w / multiple) * multiple, math.ceil(h / multiple) * multiple
        if (new_w, new_h) == (w, h):
            return img
        canvas = Image.new(img.mode, (new_w, new_h), _fill_value(img.mode, fill))
        canvas.paste(img, ((new_w - w) // 2, (new_h - h) // 2))
        return canvas
    if mode == "resize":
        new_w = max(multiple, round(w / multiple) * multiple)
        new_h = max(multiple, round(h / multiple) * multiple)
        return img if (new_w, new_h) == (w, h) else img.resize((new_w, new_h), Image.BICUBIC)
    raise ValueError(f"mode must be 'pad' or 'resize', got {mode!r}")


def _fill_value(mode: str, fill: int):
    # Image.new wants one value per band: an int for L, a tuple for RGB/RGBA
    bands = len(Image.new(mode, (1, 1)).getbands())
    return fill if bands == 1 else (fill,) * bands


def center_crop_adm(img: Image.Image, size: int) -> Image.Image:
    """ADM's centre crop (also LlamaGen's): size x size, RGB.

    1. While the short side is at least 2 * size, halve both sides with a BOX filter (an exact average
       of 2x2 blocks: cheap, and no aliasing from one big bicubic step).
    2. Scale so the short side is ``size`` with BICUBIC; the long side is rounded.
    3. Cut the centre size x size (offsets rounded down).
    """
    if size < 1:
        raise ValueError(f"crop size must be >= 1, got {size}")
    img = to_rgb(img)
    while min(img.size) >= 2 * size:
        img = img.resize(tuple(s // 2 for s in img.size), resample=Image.BOX)
    scale = size / min(img.size)
    img = img.resize(tuple(round(s * scale) for s in img.size), resample=Image.BICUBIC)
    w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    return img.crop((left, top, left + size, top + size))


def _crop_offsets(w: int, h: int, size: int) -> dict[str, tuple[int, int]]:
    """(left, top) of each of the five crops; the centre offset rounds half to even, like torchvision."""
    if size > w or size > h:
        raise ValueError(f"crop size {size} is larger than the image ({w}x{h})")
    return {
        "tl": (0, 0),
        "tr": (w - size, 0),
        "bl": (0, h - size),
        "br": (w - size, h - size),
        "center": (int(round((w - size) / 2)), int(round((h - size) / 2))),
    }


def five_crop(img: Image.Image, size: int) -> list[Image.Image]:
    """The four corner crops and the centre crop, size x size, in the order tl, tr, bl, br, centre."""
    offsets = _crop_offsets(*img.size, size)
    return [img.crop((x, y, x + size, y + size)) for x, y in (offsets[n] for n in FIVE_CROP_NAMES)]


def ten_crop(img: Image.Image, size: int) -> list[Image.Image]:
    """five_crop of the image, then five_crop of its horizontal mirror image (torchvision's TenCrop,
    which LlamaGen's code extraction uses, so crop k means the same view in both).

    "flip_tl" is the top-left crop of the mirrored image, i.e. the mirror of the top-right crop.
    """
    return five_crop(img, size) + five_crop(img.transpose(Image.FLIP_LEFT_RIGHT), size)


def crops_for_extraction(
    img: Image.Image, image_size: int, crop_range: float = 1.1, crops: str = "ten"
) -> list[Image.Image]:
    """The crops code extraction encodes for one image, each image_size x image_size RGB.

    ADM centre crop to int(image_size * crop_range) (a little larger than the target, so the corner
    crops are shifted views), then the crop set: "ten" (ten_crop), "five" (five_crop) or "center"
    (the single centre crop). LlamaGen uses crop_range 1.1 and a second set at 1.05.
    """
    if crops not in CROP_SETS:
        raise ValueError(f"crops must be one of {', '.join(CROP_SETS)}, got {crops!r}")
    if crop_range < 1.0:
        raise ValueError(f"crop_range must be >= 1 (the crops are cut from a larger centre crop), got {crop_range}")
    big = center_crop_adm(img, int(image_size * crop_range))
    if crops == "ten":
        return ten_crop(big, image_size)
    if crops == "five":
        return five_crop(big, image_size)
    x, y = _crop_offsets(*big.size, image_size)["center"]
    return [big.crop((x, y, x + image_size, y + image_size))]
