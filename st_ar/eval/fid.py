"""FID and the metrics beside it (sFID, KID, improved precision/recall, IS) of a sample set against a
reference, in the features of an InceptionV3 (``st-ar eval fid``).

    results = evaluate_fid("samples.npz", "VIRTUAL_imagenet256_labeled.npz")
    results = evaluate_fid("samples.npz", "mnist", ref_split="test", max_samples=5000)

The reference is an ADM reference batch (.npz with arr_0 images and/or precomputed mu/sigma), a dataset
name, or an image folder. Statistics computed from reference images are cached per (source, network)
(``eval.inception.load_or_compute_reference``). A metric the inputs cannot give is listed in
``results["not_computed"]`` with the reason.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import numpy as np

from ..data.codes import file_sha256
from ..distributed import DistInfo
from ..runfolder import atomic_write
from .inception import InceptionFeatures, compute_features, file_identity, load_or_compute_reference
from .metrics import feature_stats, frechet_distance, inception_score, kid, precision_recall
from .samples import DatasetImages, load_samples, random_subset, subset_tag


class FidResult(NamedTuple):
    results: dict  # samples, num_samples, ref, the metrics, and not_computed: {metric: why not}
    reference: str  # where the reference statistics came from: precomputed, cached, or computed from images


def reference_statistics(
    ref: str,
    model: InceptionFeatures,
    *,
    ref_split: str = "test",
    max_samples: int | None = None,
    batch_size: int = 50,
    info: DistInfo | None = None,
    cache: bool = True,
) -> tuple[dict[str, np.ndarray], str]:
    """Reference statistics (features, mu, sigma, ...) and a description of where they came from."""
    if os.path.isfile(ref) and ref.endswith(".npz"):
        with np.load(ref) as z:
            keys = set(z.files)
            if "arr_0" not in keys:
                if not {"mu", "sigma"} <= keys:
                    raise ValueError(f"{ref} holds neither arr_0 images nor mu/sigma (keys: {', '.join(z.files)})")
                if "network_sha256" in keys:  # written by save_statistics: refuse another network's statistics
                    check_network(ref, str(z["network_sha256"]), model)
                stats = {"mu": z["mu"], "sigma": z["sigma"].astype(np.float64)}
                if {"mu_s", "sigma_s"} <= keys:
                    stats.update(mu_s=z["mu_s"], sigma_s=z["sigma_s"])
                return stats, "precomputed mu/sigma"
        source_id = f"npz:{file_identity(ref)}:{subset_tag(max_samples)}"

        def images():
            return random_subset(load_samples(ref), max_samples)

    else:
        source = file_identity(ref) if os.path.isdir(ref) else ref.lower()
        source_id = f"dataset:{source}:{ref_split}:{subset_tag(max_samples)}"

        def images():
            return random_subset(DatasetImages(ref, ref_split), max_samples)

    if not cache:
        source_id += f":nocache{os.getpid()}"
    stats, cached = load_or_compute_reference(source_id, images, model, batch_size, info)
    return stats, "cached reference statistics" if cached else "reference images"


def save_statistics(path: str, stats: dict[str, np.ndarray], model: InceptionFeatures, source: str) -> None:
    """Write the mu/sigma of ``stats`` as a precomputed reference for ``--ref`` (no features: FID only),
    with the network's content hash, checked when it is read, and ``source``, what the images were.
    sigma is kept in float32, half the bytes: it moved FIDs of 5.6 to 140 by under 1e-6 (Fashion-MNIST)."""
    out = {"mu": stats["mu"].astype(np.float64), "sigma": stats["sigma"].astype(np.float32)}
    out.update(network_sha256=np.array(file_sha256(model.path)), source=np.array(source))
    atomic_write(path, lambda f: np.savez_compressed(f, **out))


def check_network(ref: str, network_sha256: str, model: InceptionFeatures) -> None:
    if file_sha256(model.path) != network_sha256:
        raise ValueError(
            f"{ref} holds statistics of another Inception network (sha256 {network_sha256[:12]}..., this one is "
            f"{model.path}); FIDs against them would not compare: compute the reference with this network instead"
        )


PR_NEIGHBOURS = 3  # improved precision/recall's k, as the ADM evaluator


def fid_metrics(feats: dict[str, np.ndarray], ref: dict[str, np.ndarray]) -> tuple[dict[str, float], dict[str, str]]:
    """Every metric the sample features ``feats`` and the reference ``ref`` allow; (metrics, {name: why not})."""
    results: dict[str, float] = {}
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
        fewest = min(len(ref["features"]), len(feats["pool"]))
        results["kid"], results["kid_std"] = kid(ref["features"], feats["pool"])  # FID already needs 2 per side
        if fewest > PR_NEIGHBOURS:  # a ball's radius is the distance to the k-th neighbour in its own set
            results["precision"], results["recall"] = precision_recall(ref["features"], feats["pool"], k=PR_NEIGHBOURS)
        else:
            for name in ("precision", "recall"):
                notes[name] = f"needs more than {PR_NEIGHBOURS} images on each side (k = {PR_NEIGHBOURS}), got {fewest}"
    else:
        for name in ("kid", "precision", "recall"):
            notes[name] = "the reference holds only mu/sigma; KID and precision/recall need reference images"
    return results, notes


def evaluate_fid(
    samples: str,
    ref: str,
    *,
    ref_split: str = "test",
    max_samples: int | None = None,
    batch_size: int = 50,
    inception: str | None = None,
    info: DistInfo | None = None,
    cache: bool = True,
) -> FidResult | None:
    """The metrics of the samples (an .npz or a folder) against ``ref``, and where the reference statistics
    came from; None on ranks other than 0 (every rank extracts its share of the features). ``inception``:
    a TorchScript network instead of the bundled InceptionV3."""
    info = info or DistInfo()
    model = InceptionFeatures(inception, device=info.device)
    images = random_subset(load_samples(samples), max_samples)
    ref_stats, ref_from = reference_statistics(
        ref, model, ref_split=ref_split, max_samples=max_samples, batch_size=batch_size, info=info, cache=cache
    )
    feats = compute_features(model, images, batch_size, info, desc="samples")
    if not info.is_main:
        return None
    metrics, notes = fid_metrics(feats, ref_stats)
    results = {"samples": samples, "num_samples": len(images), "ref": ref, **metrics, "not_computed": notes}
    return FidResult(results, ref_from)
