"""The stages from a dataset to measured models, as functions:

    train_tokenizer    a VQ tokenizer on the dataset (resumes from its checkpoint)
    extract_split      the codes of one split (the train split's crops, the test split's centre crop)
    gpt_run_config     the RunConfig of one GPT run on those codes, built from a preset
    train_gpt          that run (resumes from its checkpoint)
    sample_model       class-conditional samples of a trained GPT: samples.npz, codes.npy, grid.png
    Evaluator          class accuracy, domain FID, Inception FID and the linear-probe curve of a model

``st-ar demo`` (st_ar/demo.py) runs them once each with its stage bookkeeping and report;
benchmarks/reproduce.py runs them for every run of the ablation. Every setting is an argument: the two
callers differ only in the values they pass.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

import numpy as np

from .config import RunConfig, preset
from .data.codes import read_codes_meta

# --------------------------------------------------------------------------------------------------
# Tokenizer and codes
# --------------------------------------------------------------------------------------------------


def train_tokenizer(
    out: str,
    *,
    dataset: str,
    image_size: int,
    vq_preset: str,
    vq_args: dict[str, Any],
    steps: int,
    eval_images: int,
    seed: int,
) -> dict:
    """Train (or finish training) a tokenizer in ``out``; its PSNR, codebook usage and perplexity on the first
    ``eval_images`` test images."""
    from torch.utils.data import Subset

    from .data.datasets import open_dataset
    from .tokenizer.train import TokenizerTrainConfig, checkpoint_path
    from .tokenizer.train import train as train_vq

    config = TokenizerTrainConfig(
        out=out,
        dataset=dataset,
        image_size=image_size,
        preset=vq_preset,
        vq_args=vq_args,
        steps=steps,
        eval_every=0,
        save_every=100,
        seed=seed,
    )
    test = open_dataset(dataset, "test")
    held_out = Subset(test, range(min(eval_images, len(test))))
    metrics = train_vq(config, resume=os.path.exists(checkpoint_path(out)), eval_set=held_out)
    return {k: metrics[k] for k in ("psnr", "codebook_usage", "perplexity", "images") if k in metrics}


def extract_split(
    tokenizer: str,
    out: str,
    split: str,
    *,
    dataset: str,
    image_size: int,
    limit: int,
    crops: str,
    crop_range: float,
) -> dict:
    """The codes of the first ``limit`` images of ``split`` in ``out``: ``crops`` of each training image; the
    centre crop alone of any other split (it only feeds the probe, which takes one view)."""
    from .data.codes import extract_codes
    from .data.datasets import open_dataset

    report = extract_codes(
        open_dataset(dataset, split),
        tokenizer,
        out,
        image_size=image_size,
        crop_ranges=(crop_range,),
        crops=crops if split == "train" else "center",
        batch_size=256,
        limit=limit,
        chunk_size=2000,
    )
    meta = read_codes_meta(out)
    return {"images": meta["count"], "crops": meta["num_crops"], "seconds": round(report.seconds, 1)}


def codes_finished(folder: str) -> bool:
    """Whether ``folder`` holds a complete extraction (absent or stopped part way: no)."""
    try:
        read_codes_meta(folder)
        return True
    except (ValueError, FileNotFoundError):
        return False


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------


def codes_model_args(meta: dict) -> dict:
    """The GPT fields an extraction fixes: vocabulary, tokens per image, classes."""
    return dict(vocab_size=meta["vocab_size"], block_size=meta["seq_len"], num_classes=meta["num_classes"])


def gpt_run_config(
    preset_name: str,
    codes: str,
    out: str,
    *,
    model: str,
    model_args: dict[str, Any],
    batch_size: int,
    lr: float,
    steps: int,
    log_every: int,
    precision: str,
    seed: int,
    objective: dict[str, Any] | None = None,
    teacher: dict[str, Any] | None = None,
) -> RunConfig:
    """Preset ``preset_name`` trained on ``codes`` into ``out``: GPT ``model`` with the preset's model
    arguments, then ``model_args``, then what the codes fix (vocabulary, tokens, classes); ``batch_size``
    images per step at an unscaled ``lr``; a checkpoint every quarter of the run. ``objective`` and
    ``teacher``: ObjectiveConfig and TeacherConfig fields changed from the preset's."""
    base = preset(preset_name)
    args = {**base.model.args, **model_args, **codes_model_args(read_codes_meta(codes))}
    return dataclasses.replace(
        base,
        model=dataclasses.replace(base.model, name=model, args=args),
        data=dataclasses.replace(base.data, codes=codes),
        objective=dataclasses.replace(base.objective, **(objective or {})),
        teacher=dataclasses.replace(base.teacher, **(teacher or {})),
        optim=dataclasses.replace(base.optim, batch_size=batch_size, lr=lr, scale_lr=False),
        train=dataclasses.replace(
            base.train,
            steps=steps,
            save_every=max(1, steps // 4),
            log_every=log_every,
            precision=precision,
            seed=seed,
            out_dir=out,
        ),
    )


def train_gpt(cfg: RunConfig) -> tuple[dict, float]:
    """Train (or finish) the run; its summary (st_ar.train.loop.train) and the seconds this call took.
    The summary holds the run's whole training compute: ``flops`` (cumulative analytic FLOPs, all ranks,
    train/flops.py) and ``train_seconds`` (the measured time of its training steps, evaluation, previews
    and checkpoints excluded), both carried across resumes. Ctrl-C during training raises
    KeyboardInterrupt here, after the checkpoint is saved."""
    from .train.loop import train

    t0 = time.perf_counter()
    summary = train(cfg)
    if not summary["finished"]:
        raise KeyboardInterrupt  # stopped by Ctrl-C: the checkpoint is saved, the next run resumes
    return summary, time.perf_counter() - t0


# --------------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------------


def sample_model(
    model_path: str,
    tokenizer: str,
    out: str,
    *,
    per_class: int,
    batch_size: int,
    cfg_scale: float,
    temperature: float,
    seed: int,
    desc: str = "sampling",
) -> dict:
    """``per_class`` samples of every class of one model, in class order, into out/samples.npz, out/codes.npy
    and out/grid.png (row c of the grid: the first 10 samples of class c). One process, one generator
    seeded with ``seed`` (``seeding="stream"``): every model sampled with the same settings gets the same
    random numbers."""
    from .models.gpt import GPT
    from .models.vq import VQModel
    from .sampling.to_file import SampleSettings, class_grid, sample_to_files

    vq = VQModel.from_checkpoint(tokenizer).eval()
    model = GPT.from_checkpoint(model_path).eval()
    classes = model.config.num_classes
    settings = SampleSettings(
        cfg_scale=cfg_scale, temperature=temperature, batch_size=batch_size, seed=seed, seeding="stream"
    )
    labels = [c for c in range(classes) for _ in range(per_class)]
    report = sample_to_files(model, vq, labels, out, settings, grid=class_grid(classes, per_class), desc=desc)
    return {"samples": report.samples, "tokens_per_s": report.samples * model.config.block_size / report.seconds}


# --------------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------------


def center_view_codes(folder: str, limit: int | None):
    """(N, T) codes of the centre crop of the first ``limit`` images of an extraction, and their labels."""
    from .eval.probe import first_view_codes

    names = read_codes_meta(folder)["crop_names"]
    return first_view_codes(folder, limit, view=names.index("center"))


class Evaluator:
    """What every model is measured against, prepared once: the domain classifier, real test images and
    their Inception statistics, and the probe's codes (centre crops of train and test images).

    ``test_images`` real test images (a random subset, from ``seed``; None: all of them) are the reference
    of the domain FID. ``fid_samples`` None measures every sample's Inception features against all test
    images, whose statistics are cached (eval/fid.reference_statistics), or read from ``fid_reference``, a
    precomputed mu/sigma .npz of them (eval/fid.save_statistics); a number N measures a random N of the
    samples against the first N of those real images. The probe trains on the first
    ``probe_train_images`` of ``train_codes`` for ``probe_epochs`` and is tested on the first
    ``probe_test_images`` of ``test_codes`` (None: all).
    """

    def __init__(
        self,
        train_codes: str,
        test_codes: str,
        *,
        dataset: str,
        classifier_images: int | None,
        classifier_epochs: int,
        probe_train_images: int,
        probe_epochs: int,
        seed: int,
        test_images: int | None = None,
        fid_samples: int | None = None,
        probe_test_images: int | None = None,
        fid_reference: str | None = None,
    ):
        from .eval.domain import DomainClassifier, dataset_arrays
        from .eval.fid import reference_statistics
        from .eval.inception import InceptionFeatures, compute_features
        from .eval.metrics import feature_stats

        if fid_samples is None and test_images is not None:
            raise ValueError("fid_samples None compares with every test image: give fid_samples, or no test_images")
        if fid_reference is not None and fid_samples is not None:
            raise ValueError("fid_reference holds the statistics of every test image: give it with fid_samples None")
        self.seed, self.probe_epochs = seed, probe_epochs
        self.classifier = DomainClassifier.load_or_train(
            dataset, epochs=classifier_epochs, max_images=classifier_images, seed=seed
        )
        self.real, real_labels, _ = dataset_arrays(dataset, "test", max_images=test_images, seed=seed)
        self.real_domain = feature_stats(self.classifier.features(self.real))  # (mu, sigma), once for all models
        self.inception = InceptionFeatures()
        if fid_samples is None:  # every test image: statistics cached across runs and processes
            self.n_fid = None
            ref = fid_reference or dataset
            stats, _ = reference_statistics(ref, self.inception, ref_split="test", batch_size=20)
            self.ref_stats = (stats["mu"], stats["sigma"])
        else:
            self.n_fid = min(fid_samples, len(self.real))
            ref = compute_features(
                self.inception, self.real[: self.n_fid], batch_size=20, desc="Inception, real images"
            )
            self.ref_stats = feature_stats(ref["pool"])
        self.probe_train = center_view_codes(train_codes, probe_train_images)
        self.probe_test = center_view_codes(test_codes, probe_test_images)
        self.summary = {
            "classifier_test_accuracy": self.classifier.class_accuracy(self.real, real_labels),
            "fid_reference_images": self.n_fid or len(self.real),
            "real_test_images": len(self.real),
        }

    def samples(self, samples_npz: str, inception: bool = True) -> dict:
        """Class accuracy and domain FID (small CNN) of a sample set, and its Inception FID if ``inception``."""
        from .eval.domain import domain_fid_to
        from .eval.inception import compute_features
        from .eval.metrics import feature_stats, frechet_distance

        with np.load(samples_npz) as z:
            images, labels = z["arr_0"], z["labels"]
        out = {
            "samples": len(images),
            "class_accuracy": self.classifier.class_accuracy(images, labels),
            "domain_fid": domain_fid_to(self.classifier, images, self.real_domain),
        }
        if inception:
            if self.n_fid is not None:
                # samples come in class order: a random subset keeps every class in the FID sample
                images = images[np.random.default_rng(self.seed).permutation(len(images))[: self.n_fid]]
            feats = compute_features(self.inception, images, batch_size=20, desc="Inception, samples")["pool"]
            out["fid"] = frechet_distance(*feature_stats(feats), *self.ref_stats)
            out["fid_samples"] = len(images)
        return out

    def probe(self, model_path: str) -> dict:
        """The linear probe's accuracy at every probed step of one model, at its middle layer."""
        from .eval.probe import probe_curve
        from .models.gpt import GPT

        model = GPT.from_checkpoint(model_path).eval()
        layer = model.config.n_layer // 2
        curve = probe_curve(
            model, self.probe_train, self.probe_test, layer=layer, epochs=self.probe_epochs, seed=self.seed
        ).accuracy
        return {"layer": layer, "accuracy": {str(s): a for s, a in curve.items()}}

    def __call__(self, model_path: str, samples_npz: str) -> dict:
        """Every metric of one model: its samples' (with Inception FID) and its probe curve."""
        measured = self.samples(samples_npz)
        del measured["samples"]
        probe = self.probe(model_path)
        return {**measured, "probe_layer": probe["layer"], "probe": probe["accuracy"]}
