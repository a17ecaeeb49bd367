"""Tokenizer training on tiny synthetic data: losses fall, resume is exact, checkpoints are complete,
optional losses run, NaN stops cleanly, metrics match hand-computed values, the CLI works end to end."""

import hashlib
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from st_ar.cli import main
from st_ar.models.loading import CheckpointError
from st_ar.models.vq import VQConfig, VQModel
from st_ar.tokenizer import (
    NonFiniteLossError,
    PerceptualLoss,
    TokenizerTrainConfig,
    code_histogram,
    codebook_usage,
    evaluate,
    perplexity,
    psnr,
    train,
)
from st_ar.tokenizer.train import TokenizerImages, checkpoint_path, deterministic_on_cpu
from st_ar.train.sampler import StepBatches


class Shapes(torch.utils.data.Dataset):
    """Deterministic 14x14 RGB images of one bright rectangle on black (padded to 16 in training)."""

    def __init__(self, n: int, seed: int = 0, poisoned: bool = False):
        g = np.random.default_rng(seed)
        self.boxes = g.integers(0, 14, size=(n, 4))
        self.colors = g.integers(80, 256, size=(n, 3))
        self.poisoned = poisoned

    def __len__(self):
        return len(self.boxes)

    def __getitem__(self, i):
        if self.poisoned:  # prepared (3, 16, 16) tensors, all NaN
            return torch.full((3, 16, 16), float("nan")), 0
        x0, y0, x1, y1 = self.boxes[i]
        arr = np.zeros((14, 14, 3), dtype=np.uint8)
        arr[min(y0, y1) : max(y0, y1) + 2, min(x0, x1) : max(x0, x1) + 2] = self.colors[i]
        return Image.fromarray(arr), i % 3


TINY = dict(
    preset="VQ-debug",  # downsample 2: 16 px -> 8x8 codes, 64 codes
    image_size=16,
    batch_size=8,
    lr=2e-3,
    log_every=1,
    eval_every=0,
    eval_samples=0,
    save_every=0,
    num_workers=0,
    device="cpu",
)


def tiny_config(out, **kw) -> TokenizerTrainConfig:
    return TokenizerTrainConfig(out=str(out), **{**TINY, **kw})


@pytest.fixture(scope="module")
def data():
    return Shapes(64, seed=1), Shapes(16, seed=2)


def read_metrics(run_dir) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def sha(path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


# ---------------------------------------------------------------------------------------------
# metrics against hand-computed values
# ---------------------------------------------------------------------------------------------


def test_psnr_hand_values():
    ref = torch.full((2, 3, 4, 4), -1.0)  # 8-bit 0
    rec = torch.full((2, 3, 4, 4), 51 / 127.5 - 1)  # 8-bit 51 everywhere: mse (51/255)^2 = 0.04
    rec[1] = -1.0  # identical image: capped
    got = psnr(ref, rec)
    assert got[0].item() == pytest.approx(10 * math.log10(1 / 0.04), abs=1e-4)  # 13.979 dB
    assert got[1].item() == pytest.approx(100.0)
    # one pixel of 48 off by 255: mse = 255^2 / 48 -> 10 log10(48) dB
    rec = ref.clone()
    rec[0, 0, 0, 0] = 1.0
    assert psnr(ref, rec)[0].item() == pytest.approx(10 * math.log10(48), abs=1e-4)


def test_usage_and_perplexity_hand_values():
    codes = torch.tensor([[0, 0], [1, 2]])
    hist = code_histogram(codes, 4)
    assert hist.tolist() == [2, 1, 1, 0]
    assert codebook_usage(hist) == 0.75
    # p = (1/2, 1/4, 1/4): entropy 1.5 bits -> perplexity 2^1.5
    assert perplexity(hist) == pytest.approx(2**1.5)
    assert perplexity(torch.tensor([5, 5, 5, 5])) == pytest.approx(4.0)
    assert perplexity(torch.tensor([0, 7, 0])) == pytest.approx(1.0)


def step_batches(size, batch, start, stop, **kw) -> list[list[int]]:
    sampler = StepBatches(size, batch, **kw)
    sampler.set_steps(start, stop)
    return list(sampler)


def test_step_batches_cover_epochs_and_resume_mid_epoch():
    full = step_batches(10, 3, 0, 7, seed=5)  # 3 batches per epoch, 1 image dropped
    assert all(len(b) == 3 for b in full)
    assert len(set(sum(full[:3], []))) == 9 and full[:3] != full[3:6]  # epochs shuffle differently
    assert step_batches(10, 3, 4, 7, seed=5) == full[4:]
    ranks = [step_batches(10, 2, 0, 2, seed=5, rank=r, world_size=2) for r in range(2)]
    assert not set(sum(ranks[0], [])) & set(sum(ranks[1], []))  # ranks see disjoint images
    # accumulation: a step is `accum` consecutive batches, the leftover batch of an epoch is dropped
    accum = step_batches(10, 2, 0, 4, seed=5, accum=2)  # 5 batches per epoch -> 2 steps
    assert accum[:4] == step_batches(10, 2, 0, 4, seed=5)[:4] and len(accum) == 8
    assert accum[4:] == step_batches(10, 2, 2, 4, seed=5, accum=2)
    with pytest.raises(ValueError, match="fewer than one step's batch"):
        StepBatches(10, 4, accum=2, world_size=2)


# ---------------------------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------------------------


def test_codebook_gradient_is_deterministic_on_cpu():
    """The codebook's gradient is a scatter-add over 65536 chosen codes: several threads would sum it in
    a varying order, so training switches on deterministic kernels (and restores the setting)."""
    quantizer = VQModel(VQConfig.from_name("VQ-debug")).quantize
    latent = torch.randn(1, 8, 256, 256)

    def grad():
        quantizer.zero_grad()
        quantizer(latent).codebook_loss.backward()
        return quantizer.embedding.weight.grad.clone()

    assert not torch.are_deterministic_algorithms_enabled()
    with deterministic_on_cpu(torch.device("cpu")):
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.equal(grad(), grad())
    assert not torch.are_deterministic_algorithms_enabled()


def test_loss_decreases(tmp_path, data):
    train(tiny_config(tmp_path / "run", steps=30), train_set=data[0], eval_set=data[1])
    recon = [m["loss/recon"] for m in read_metrics(tmp_path / "run") if "loss/recon" in m]
    assert len(recon) == 30
    assert np.mean(recon[-5:]) < 0.5 * np.mean(recon[:5])


def assert_same_run(dir_a, dir_b):
    a = torch.load(checkpoint_path(str(dir_a)), weights_only=True)
    b = torch.load(checkpoint_path(str(dir_b)), weights_only=True)
    assert a["step"] == b["step"]
    for key in ("model", "ema", "discriminator"):
        if a[key] is None:
            assert b[key] is None
            continue
        assert a[key].keys() == b[key].keys()
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key}.{name} differs after resume"
    for key in ("optimizer", "disc_optimizer"):
        if a[key] is None:
            continue
        for pid, st in a[key]["state"].items():
            for name, t in st.items():
                assert torch.equal(t, b[key]["state"][pid][name]), f"{key} state {pid}.{name} differs"
    assert (a["dead_code_counts"] is None) == (b["dead_code_counts"] is None)
    if a["dead_code_counts"] is not None:
        assert torch.equal(a["dead_code_counts"], b["dead_code_counts"])


EVERY_OPTION = dict(
    gan_weight=0.5,
    gan_start_step=2,
    disc_layers=2,  # 16 px images
    ema_decay=0.9,
    dead_code_reinit=2,
    entropy_weight=0.1,
    warmup_steps=2,
    save_every=2,
)


def test_resume_is_exact_n_plus_n_equals_2n(tmp_path, data):
    """3 steps, then resume to 6 == 6 steps straight: GAN (started mid-run), EMA, dead-code re-init,
    entropy loss, warm-up and a mid-run save all included."""
    sets = dict(train_set=data[0], eval_set=data[1])
    train(tiny_config(tmp_path / "straight", steps=6, **EVERY_OPTION), **sets)
    train(tiny_config(tmp_path / "split", steps=3, **EVERY_OPTION), **sets)
    train(tiny_config(tmp_path / "split", steps=6, **EVERY_OPTION), resume=True, **sets)
    assert_same_run(tmp_path / "straight", tmp_path / "split")
    assert any("loss/gan_d" in m for m in read_metrics(tmp_path / "split"))
    assert any("codebook/reinit" in m for m in read_metrics(tmp_path / "split"))


def test_resume_is_exact_with_a_cosine_schedule(tmp_path, data):
    # the cosine schedule depends on `steps`, so the first leg keeps steps=5 and stops early
    sets = dict(train_set=data[0], eval_set=data[1])
    cosine = dict(steps=5, lr_schedule="cosine", warmup_steps=1)
    train(tiny_config(tmp_path / "straight", **cosine), **sets)
    assert train(tiny_config(tmp_path / "split", **cosine), stop_at=2, **sets) == {"step": 2}
    assert not (tmp_path / "split" / "eval.json").exists()
    train(tiny_config(tmp_path / "split", **cosine), resume=True, **sets)
    assert_same_run(tmp_path / "straight", tmp_path / "split")


def test_a_run_folder_resumes_by_itself_and_refuses_changed_settings(tmp_path, data):
    sets = dict(train_set=data[0], eval_set=data[1])
    train(tiny_config(tmp_path / "straight", steps=2), **sets)
    train(tiny_config(tmp_path / "run", steps=1), **sets)
    train(tiny_config(tmp_path / "run", steps=2), **sets)  # no resume=True: the folder holds a run
    assert_same_run(tmp_path / "straight", tmp_path / "run")
    with pytest.raises(CheckpointError, match="lr: checkpoint 0.002, now 0.001"):
        train(tiny_config(tmp_path / "run", steps=3, lr=1e-3), **sets)
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        train(tiny_config(tmp_path / "other", steps=2), resume=True, **sets)


def test_resume_refuses_another_number_of_processes(tmp_path, data):
    run = tmp_path / "run"
    train(tiny_config(run, steps=1), train_set=data[0], eval_set=data[1])
    ckpt = torch.load(checkpoint_path(str(run)), weights_only=True)
    assert len(ckpt["rng"]) == ckpt["world_size"] == 1  # every rank's streams
    ckpt["rng"], ckpt["world_size"] = ckpt["rng"] * 2, 2
    torch.save(ckpt, checkpoint_path(str(run)))
    with pytest.raises(CheckpointError, match="written by 2 processes, this run has 1"):
        train(tiny_config(run, steps=2), train_set=data[0], eval_set=data[1])
    # a file from before every rank's streams were kept (one dict, rank 0's) still resumes
    ckpt["rng"], ckpt["world_size"] = ckpt["rng"][0], 1
    torch.save(ckpt, checkpoint_path(str(run)))
    assert train(tiny_config(run, steps=2), train_set=data[0], eval_set=data[1])["step"] == 2


def test_run_folder_is_complete_and_tokenizer_loads(tmp_path, data):
    run = tmp_path / "run"
    results = train(
        tiny_config(run, steps=4, ema_decay=0.5, eval_every=2, eval_samples=8), train_set=data[0], eval_set=data[1]
    )
    ckpt = torch.load(checkpoint_path(str(run)), weights_only=True)
    assert {
        "kind",
        "step",
        "config",
        "vq_config",
        "model",
        "ema",
        "discriminator",
        "optimizer",
        "disc_optimizer",
    } <= set(ckpt)
    assert {"dead_code_counts", "rng", "world_size"} <= set(ckpt)
    assert ckpt["step"] == 4 and ckpt["discriminator"] is None and torch.is_tensor(ckpt["rng"][0]["torch"])  # per rank
    assert ckpt["config"]["preset"] == "VQ-debug"

    vq = VQModel.from_checkpoint(run / "tokenizer.pt")  # no preset name needed
    assert vq.config.codebook_size == 64
    for name, t in vq.state_dict().items():  # the exported weights are the EMA's
        assert torch.equal(t, ckpt["ema"][name])

    saved = json.loads((run / "eval.json").read_text())
    assert saved == pytest.approx(results)
    assert saved["images"] == 16 and saved["weights"] == "ema" and saved["step"] == 4
    assert 0 < saved["codebook_usage"] <= 1 and 1 <= saved["perplexity"] <= 64 and saved["psnr"] > 0
    # evaluating the exported tokenizer by hand gives the same numbers
    again = evaluate(vq, TokenizerImages(data[1], 16), batch_size=5)
    assert again["psnr"] == pytest.approx(saved["psnr"], abs=1e-4)
    assert again["codes_used"] == saved["codes_used"]

    assert sorted(os.listdir(run / "recon")) == ["step_0000002.png", "step_0000004.png"]
    grid = Image.open(run / "recon" / "step_0000004.png")
    assert grid.size == (8 * 18 + 2, 4 * 18 + 2)  # 8 per row; originals and reconstructions: 4 rows of 16 px
    assert json.loads((run / "config.json").read_text())["vq"]["codebook_size"] == 64
    logged = read_metrics(run)
    assert any("eval/psnr" in m for m in logged) and "codebook/usage_window" in logged[0]
    assert os.listdir(run / "tensorboard")


def test_gan_without_adaptive_weight_runs(tmp_path, data):
    train(
        tiny_config(tmp_path / "run", steps=2, gan_weight=0.1, gan_adaptive=False, disc_layers=2),
        train_set=data[0],
        eval_set=data[1],
    )
    last = read_metrics(tmp_path / "run")[-2]
    assert last["gan/weight"] == pytest.approx(0.1) and "loss/gan_d" in last


class TinyFeatures(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.b = torch.nn.Conv2d(4, 8, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        h = torch.relu(self.a(x))
        return [h, torch.relu(self.b(h))]


def save_exported(path):
    auto = torch.export.Dim.AUTO  # any batch size and resolution
    program = torch.export.export(
        TinyFeatures().eval(), (torch.randn(2, 3, 8, 8),), dynamic_shapes=({0: auto, 2: auto, 3: auto},)
    )
    torch.export.save(program, str(path))


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")
@pytest.mark.parametrize("kind", ["export", "torchscript"])
def test_perceptual_loss_from_a_saved_network(tmp_path, data, kind):
    path = tmp_path / "features.pt2"
    if kind == "export":
        save_exported(path)
    else:
        torch.jit.save(torch.jit.script(TinyFeatures()), str(path))
    loss = PerceptualLoss(path)
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    assert loss(x, x).item() == pytest.approx(0.0, abs=1e-6)
    assert loss(x, -x).item() > 0
    train(
        tiny_config(tmp_path / "run", steps=2, perceptual_weight=1.0, perceptual_weights=str(path)),
        train_set=data[0],
        eval_set=data[1],
    )
    assert all(m["loss/perceptual"] > 0 for m in read_metrics(tmp_path / "run") if "loss/recon" in m)


def test_perceptual_loss_errors(tmp_path, data):
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        train(
            tiny_config(tmp_path / "run", steps=1, perceptual_weight=1.0, perceptual_weights=str(tmp_path / "no.pt")),
            train_set=data[0],
            eval_set=data[1],
        )
    with pytest.raises(ValueError, match="needs perceptual_weights"):
        tiny_config(tmp_path / "run", perceptual_weight=1.0)
    plain = tmp_path / "state_dict.pt"
    torch.save(TinyFeatures().state_dict(), plain)
    with pytest.raises(ValueError, match="neither a torch.export program nor a TorchScript module"):
        PerceptualLoss(plain)


def test_non_finite_loss_stops_and_keeps_the_checkpoint(tmp_path, data):
    run = tmp_path / "run"
    train(tiny_config(run, steps=2), train_set=data[0], eval_set=data[1])
    before = sha(checkpoint_path(str(run))), sha(run / "tokenizer.pt")
    with pytest.raises(NonFiniteLossError, match=r"step 3 .*last good checkpoint .*last\.pt \(step 2\) is intact"):
        train(tiny_config(run, steps=4), resume=True, train_set=Shapes(64, poisoned=True), eval_set=data[1])
    assert (sha(checkpoint_path(str(run))), sha(run / "tokenizer.pt")) == before
    assert torch.load(checkpoint_path(str(run)), weights_only=True)["step"] == 2


class InterruptAt(Shapes):
    """Sends this process SIGINT (Ctrl-C) when the given image is loaded."""

    def __init__(self, n, at):
        super().__init__(n, seed=1)
        self.at = at

    def __getitem__(self, i):
        if i == self.at:
            os.kill(os.getpid(), signal.SIGINT)
        return super().__getitem__(i)


def test_ctrl_c_finishes_the_step_saves_and_resumes(tmp_path, data):
    run = tmp_path / "run"
    first = step_batches(64, 8, 0, 1, seed=0)[0][0]  # an image of step 1's batch
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(run, steps=5), train_set=InterruptAt(64, first), eval_set=data[1])
    assert torch.load(checkpoint_path(str(run)), weights_only=True)["step"] == 1
    assert not (run / "eval.json").exists()
    train(tiny_config(run, steps=3), resume=True, train_set=data[0], eval_set=data[1])
    assert json.loads((run / "eval.json").read_text())["step"] == 3


class Killed(Exception):
    pass


class CrashAt(Shapes):
    """Raises when the given image is loaded, as if the process died there."""

    def __init__(self, n, at):
        super().__init__(n, seed=1)
        self.at = at

    def __getitem__(self, i):
        if i == self.at:
            raise Killed
        return super().__getitem__(i)


def test_metrics_after_a_resume_hold_each_step_once(tmp_path, data):
    sets = dict(train_set=data[0], eval_set=data[1])
    train(tiny_config(tmp_path / "straight", steps=6), **sets)
    run = tmp_path / "run"
    # saved at step 2, logged step 3, died loading step 4's batch
    fourth = step_batches(64, 8, 3, 4, seed=0)[0][0]
    with pytest.raises(Killed):
        train(tiny_config(run, steps=6, save_every=2), train_set=CrashAt(64, fourth), eval_set=data[1])
    assert torch.load(checkpoint_path(str(run)), weights_only=True)["step"] == 2
    assert [m["step"] for m in read_metrics(run)] == [1, 2, 3]
    train(tiny_config(run, steps=6, save_every=2), resume=True, **sets)
    steps = [m["step"] for m in read_metrics(run)]
    assert steps == [m["step"] for m in read_metrics(tmp_path / "straight")]
    trained = [m["step"] for m in read_metrics(run) if "loss/total" in m]
    assert trained == [1, 2, 3, 4, 5, 6]


# ---------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------


def write_folder(root, n_per_class: int):
    for split in ("train", "test"):
        for c, color in enumerate(((255, 0, 0), (0, 200, 255))):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(n_per_class):
                arr = np.zeros((14, 14, 3), dtype=np.uint8)
                arr[i % 10 : i % 10 + 4, 2:12] = color
                Image.fromarray(arr).save(folder / f"{i}.png")


def test_cli_train_resume_and_eval(tmp_path, capsys):
    write_folder(tmp_path / "images", 8)
    run = tmp_path / "run"
    common = ["tokenizer", "train", "--out", str(run)]
    flags = [f"dataset={tmp_path / 'images'}", "preset=VQ-debug", "image_size=16"]
    flags += ["batch_size=4", 'vq_args={"codebook_size": 32}', "device=cpu", "num_workers=0"]
    assert main([*common, *flags, "steps=2", "eval_every=1"]) == 0
    assert json.loads((run / "eval.json").read_text())["codebook_size"] == 32
    # resume needs no repeated settings; changing a training setting is refused with a message
    capsys.readouterr()
    assert main([*common, "steps=3"]) == 0
    # stderr is not a terminal here: plain progress lines, no carriage-return redraws
    err = capsys.readouterr().err
    shown = [line for line in err.splitlines() if "/3 step" in line]
    assert "\r" not in err and len(shown) == 1 and shown[0].startswith("tokenizer: 3/3 step (100%)")
    assert json.loads((run / "eval.json").read_text())["step"] == 3
    capsys.readouterr()
    assert main([*common, "steps=4", "lr=0.1"]) == 2
    assert "lr: checkpoint 0.001, now 0.1" in capsys.readouterr().err
    assert main([*common, "--resume", "steps=4", "lrr=0.1"]) == 2
    assert "unknown tokenizer setting 'lrr'; did you mean lr?" in capsys.readouterr().err
    assert main(["tokenizer", "train", "--out", str(tmp_path / "none"), "--resume"]) == 2
    assert "nothing to resume" in capsys.readouterr().err
    assert main([*common, "--show", "steps=9"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert (shown["steps"], shown["preset"], shown["vq_args"]) == (9, "VQ-debug", {"codebook_size": 32})
    out = tmp_path / "m.json"
    assert (
        main(
            [
                "tokenizer",
                "eval",
                "--ckpt",
                str(run / "tokenizer.pt"),
                "--dataset",
                str(tmp_path / "images"),
                "--image-size",
                "16",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    assert json.loads(out.read_text())["images"] == 16


def test_a_full_disk_at_a_checkpoint_gives_one_line_and_keeps_the_last_one(tmp_path, small_disk, capsys):
    disk = small_disk.mount("40m")  # a first run (12 MB checkpoint, 4 MB tokenizer) fits
    write_folder(tmp_path / "images", 4)
    run = disk / "run"
    common = ["tokenizer", "train", "--out", str(run)]
    flags = [f"dataset={tmp_path / 'images'}", "preset=VQ-debug", "image_size=16"]
    flags += ["batch_size=4", "device=cpu", "num_workers=0", "eval_samples=4"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the tiny model is faster on one thread when other jobs share the cores
    try:
        assert main([*common, *flags, "steps=1"]) == 0
        ckpt = Path(checkpoint_path(str(run)))
        saved = torch.load(ckpt, weights_only=True)
        tokenizer_bytes = sha(run / "tokenizer.pt")
        small_disk.leave(disk, 2 << 20)  # room for logs, not for another checkpoint
        capsys.readouterr()
        assert main([*common, "--resume", "steps=2"]) == 2
    finally:
        torch.set_num_threads(threads)
    err = capsys.readouterr().err
    assert f"st-ar tokenizer: error: no space left on {ckpt.parent}: last.pt did not fit" in err, err
    assert f"the previous {ckpt} is intact" in err and "Traceback" not in err and "enforce fail" not in err
    assert sorted(os.listdir(ckpt.parent)) == ["last.pt"]  # no temporary file left
    kept = torch.load(ckpt, weights_only=True)
    assert kept["step"] == saved["step"] == 1
    for name, tensor in saved["model"].items():
        assert torch.equal(kept["model"][name], tensor), name
    assert sha(run / "tokenizer.pt") == tokenizer_bytes
    assert [m["step"] for m in read_metrics(run)][-1] >= 1  # every line parses
    json.loads((run / "config.json").read_text())


@pytest.mark.dist
def test_two_processes_train_like_one(tmp_path):
    """torchrun with 2 gloo ranks and half the batch each = one process with the whole batch
    (the ranks' images together are exactly the single process's batch; DDP averages gradients)."""
    write_folder(tmp_path / "images", 8)
    flags = [f"dataset={tmp_path / 'images'}", "preset=VQ-debug", "image_size=16"]
    flags += ["batch_size=4", "steps=3", "lr=1e-4", "device=cpu", "num_workers=0"]
    flags += ["ema_decay=0.5"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    two = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    done = subprocess.run(
        [*two, "-m", "st_ar.cli", "tokenizer", "train", "--out", str(tmp_path / "two"), *flags],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert main(["tokenizer", "train", "--out", str(tmp_path / "one"), *flags]) == 0
    one, two = (torch.load(tmp_path / d / "checkpoints" / "last.pt", weights_only=True) for d in ("one", "two"))
    assert two["world_size"] == 2
    # Adam turns float noise in ~zero gradients (conv biases right before a GroupNorm, which cancels
    # them) into lr-sized steps, so those few entries may differ by up to steps * lr. Without gradient
    # averaging almost every entry would differ by that much.
    for key in ("model", "ema"):
        names = [n for n in one[key] if n != "quantize.codebook_used"]  # each rank records its own codes
        diffs = torch.cat([(one[key][n] - two[key][n]).abs().flatten() for n in names])
        assert (diffs > 1e-6).float().mean() < 0.01, f"{key}: {(diffs > 1e-6).float().mean():.1%} of entries differ"
        assert diffs.max() <= 3 * 1e-4 * 1.01  # Adam moves an entry at most about lr per step
    a, b = (json.loads((tmp_path / d / "eval.json").read_text()) for d in ("one", "two"))
    assert a["images"] == b["images"] == 16 and a["codes_used"] == b["codes_used"]
    assert a["psnr"] == pytest.approx(b["psnr"], abs=1e-3)
