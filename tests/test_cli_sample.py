"""`st-ar sample` end to end on the golden GPT and a small tokenizer."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from st_ar.cli import build_parser, main
from st_ar.commands.sample import sample_settings
from st_ar.distributed import DistInfo
from st_ar.models.quantize import fp16_weight_kernel_available
from st_ar.models.vq import VQConfig, VQModel
from st_ar.sampling.generate import generate_images
from st_ar.sampling.to_file import (
    SampleSettings,
    class_grid,
    merge_parts,
    padded_labels,
    sample_own_batches,
    sample_to_files,
)

fp16_kernel = pytest.mark.skipif(not fp16_weight_kernel_available(), reason="no fbgemm fp16-weight linear")
TINY = ["--model", "GPT-debug", "--model-args", json.dumps({"vocab_size": 64, "block_size": 16, "num_classes": 10})]


@pytest.fixture()
def gpt_ckpt(gpt_golden, tmp_path):
    path = tmp_path / "gpt.pt"
    torch.save({"model": gpt_golden["checkpoint"]["model"]}, path)  # a LlamaGen-style file
    return str(path)


@pytest.fixture()
def vq_ckpt(tmp_path):
    vq = VQModel(VQConfig.from_name("VQ-debug"))  # 64 codes: matches the golden GPT's vocabulary
    path = tmp_path / "vq.pt"
    vq.save(path)
    return str(path), vq.eval()


@pytest.mark.parametrize(
    "kind,flags",
    [
        ("greedy", []),
        ("cfg", ["--cfg-scale", "2.5"]),
        # one batch of 3 (6 rows with guidance): one compiled graph serves every position
        ("cfg", ["--cfg-scale", "2.5", "--compile", "--batch-size", "3"]),
        # fp16-rounded weights move the logits a little: the golden arg-max tokens hold
        pytest.param("cfg", ["--cfg-scale", "2.5", "--fp16-weights"], marks=fp16_kernel),
    ],
    ids=["greedy", "cfg", "cfg-compiled", "cfg-fp16-weights"],
)
def test_greedy_codes_equal_golden(gpt_golden, gpt_ckpt, tmp_path, kind, flags):
    out = tmp_path / "out"
    assert (
        main(
            [
                "sample",
                "--ckpt",
                gpt_ckpt,
                *TINY,
                "--classes",
                "1,2,3",
                "--top-k",
                "1",
                "--batch-size",
                "2",
                *flags,  # a later --batch-size wins
                "--out",
                str(out),
            ]
        )
        == 0
    )
    codes = np.load(out / "codes.npy")
    assert codes.dtype == np.int64
    np.testing.assert_array_equal(codes, gpt_golden[f"generate_{kind}"].numpy())


def test_with_tokenizer_writes_npz_and_grid(gpt_ckpt, vq_ckpt, tmp_path):
    vq_path, vq = vq_ckpt
    out = tmp_path / "out"
    assert (
        main(
            [
                "sample",
                "--ckpt",
                gpt_ckpt,
                *TINY,
                "--vq-ckpt",
                vq_path,
                "--per-class",
                "2",
                "--seed",
                "3",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    codes = np.load(out / "codes.npy")
    assert codes.shape == (20, 16)
    images = np.load(out / "samples.npz")["arr_0"]
    assert images.shape == (20, 8, 8, 3) and images.dtype == np.uint8
    with torch.no_grad():
        expected = vq.decode(torch.from_numpy(codes).view(20, 4, 4))
    expected = ((expected.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert np.abs(images.astype(int) - expected.astype(int)).max() <= 1
    assert Image.open(out / "grid.png").size[0] > 8
    np.testing.assert_array_equal(np.load(out / "samples.npz")["labels"], np.repeat(np.arange(10), 2))
    assert list(np.load(out / "samples.npz").files) == ["arr_0", "labels"]
    assert not (out / "parts").exists()
    # same seed, same samples
    again = tmp_path / "again"
    main(["sample", "--ckpt", gpt_ckpt, *TINY, "--per-class", "2", "--seed", "3", "--out", str(again)])
    np.testing.assert_array_equal(np.load(again / "codes.npy"), codes)


def test_bad_input_gets_a_clear_message(gpt_golden, gpt_ckpt, tmp_path, capsys):
    out = str(tmp_path / "o")
    assert main(["sample", "--ckpt", gpt_ckpt, *TINY, "--classes", "3,12", "--out", out]) == 2
    assert "class index 12 out of range: the model has 10 classes" in capsys.readouterr().err
    assert main(["sample", "--ckpt", gpt_ckpt, "--model", "GPT-Z", "--classes", "1", "--out", out]) == 2
    assert "unknown GPT preset 'GPT-Z'" in capsys.readouterr().err
    small_vq = tmp_path / "vq32.pt"
    VQModel(VQConfig.from_name("VQ-debug", codebook_size=32)).save(small_vq)
    assert main(["sample", "--ckpt", gpt_ckpt, *TINY, "--vq-ckpt", str(small_vq), "--classes", "1", "--out", out]) == 2
    assert "codebook has 32 codes but the GPT vocabulary is 64" in capsys.readouterr().err
    assert (
        main(["sample", "--ckpt", str(tmp_path / "missing.pt"), "--model", "GPT-B", "--classes", "1", "--out", out])
        == 2
    )
    assert "checkpoint not found" in capsys.readouterr().err


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--temperature", "nan"], "temperature must be a finite number >= 0 (0 = greedy), got nan"),
        (["--temperature", "-1"], "temperature must be a finite number >= 0 (0 = greedy), got -1.0"),
        (["--top-p", "0"], "top_p must be a number in (0, 1] (1 = no nucleus filter), got 0.0"),
        (["--top-p", "-0.5"], "top_p must be a number in (0, 1] (1 = no nucleus filter), got -0.5"),
        (["--top-p", "1.5"], "top_p must be a number in (0, 1] (1 = no nucleus filter), got 1.5"),
        (["--top-k", "-3"], "top_k must be an integer >= 0 (0 = no top-k filter, 1 = greedy), got -3"),
        (["--cfg-scale", "nan"], "cfg_scale must be a finite number >= 0 (1 = no guidance), got nan"),
        (["--cfg-scale", "-1"], "cfg_scale must be a finite number >= 0 (1 = no guidance), got -1.0"),
        (["--cfg-interval", "-2"], "cfg_interval must be an integer >= -1 (-1 = guide every token), got -2"),
        (["--per-class", "0"], "--per-class must be at least 1, got 0"),
        (["--per-class", "-2"], "--per-class must be at least 1, got -2"),
        (["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
        (["--fp16-weights", "--compile"], "--fp16-weights decodes eagerly: drop --compile (or --fp16-weights)"),
        (
            ["--fp16-weights", "--precision", "bf16"],
            "--fp16-weights keeps fp32 activations: drop --precision bf16 (or --fp16-weights)",
        ),
    ],
)
def test_bad_settings_are_refused_before_any_work(gpt_ckpt, tmp_path, capsys, flags, message):
    out = tmp_path / "o"
    which = [] if "--per-class" in flags else ["--classes", "1,2"]
    assert main(["sample", "--ckpt", gpt_ckpt, *TINY, *which, *flags, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"st-ar sample: error: {message}\n" == err
    assert not out.exists()  # refused before the output folder was made


@pytest.mark.parametrize("classes", ["1,,2", ",", "1,2,", ",3", "", " ", "1, ,2", "1,x"])
def test_class_lists_with_empty_or_bad_entries_are_refused(gpt_ckpt, tmp_path, capsys, classes):
    with pytest.raises(SystemExit) as e:
        main(["sample", "--ckpt", gpt_ckpt, *TINY, "--classes", classes, "--out", str(tmp_path / "o")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "argument --classes: expected comma-separated integers" in err and repr(classes) in err


def test_greedy_settings_on_the_command_line_give_the_golden_codes(gpt_golden, gpt_ckpt, tmp_path):
    # temperature 0 is greedy as top-k 1 is; explicit filter-off values change nothing
    out = tmp_path / "out"
    flags = ["--temperature", "0", "--top-k", "0", "--top-p", "1", "--cfg-interval", "-1"]
    assert main(["sample", "--ckpt", gpt_ckpt, *TINY, "--classes", " 1, 2,3", *flags, "--out", str(out)]) == 0
    np.testing.assert_array_equal(np.load(out / "codes.npy"), gpt_golden["generate_greedy"].numpy())


def test_files_that_are_not_the_right_checkpoint_are_named(gpt_ckpt, vq_ckpt, tmp_path, capsys):
    out = str(tmp_path / "o")
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    assert main(["sample", "--ckpt", str(empty), *TINY, "--classes", "1", "--out", out]) == 2
    assert f"error: {empty} is empty (0 bytes): it was not written completely" in capsys.readouterr().err
    cut = tmp_path / "cut.pt"
    cut.write_bytes(open(gpt_ckpt, "rb").read()[:1000])
    assert main(["sample", "--ckpt", gpt_ckpt, *TINY, "--vq-ckpt", str(cut), "--classes", "1", "--out", out]) == 2
    assert f"error: {cut} is truncated (1000 bytes" in capsys.readouterr().err
    vq_path = vq_ckpt[0]
    for model in ([], TINY):
        assert main(["sample", "--ckpt", vq_path, *model, "--classes", "1", "--out", out]) == 2
        err = capsys.readouterr().err
        assert f"error: {vq_path} is a VQ tokenizer checkpoint, not a GPT: pass it as the tokenizer" in err
        assert "--vq-ckpt" in err
    assert main(["sample", "--ckpt", gpt_ckpt, *TINY, "--vq-ckpt", gpt_ckpt, "--classes", "1", "--out", out]) == 2
    assert f"error: {gpt_ckpt} is a GPT checkpoint, not a VQ tokenizer" in capsys.readouterr().err


def test_an_output_folder_that_cannot_be_written_is_refused_first(gpt_ckpt, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    out = blocker / "out"
    # the checkpoint is not even read: an unreadable one would be reported otherwise
    assert main(["sample", "--ckpt", str(tmp_path / "missing.pt"), *TINY, "--classes", "1", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"error: cannot write to --out {out}: a part of {out} is a file, not a folder" in err
    assert main(["sample", "--ckpt", gpt_ckpt, *TINY, "--classes", "1", "--out", str(blocker)]) == 2
    assert f"error: cannot write to --out {blocker}: {blocker} is a file, not a folder" in capsys.readouterr().err


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="permissions do not stop root")
def test_a_read_only_output_folder_is_refused(gpt_ckpt, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        assert main(["sample", "--ckpt", gpt_ckpt, *TINY, "--classes", "1", "--out", str(locked / "out")]) == 2
    finally:
        locked.chmod(0o700)
    assert "error: cannot write to --out" in capsys.readouterr().err
    assert not (locked / "out").exists()


def test_console_script_is_installed(tmp_path):
    result = subprocess.run([sys.executable, "-m", "st_ar.cli", "sample", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "--cfg-interval" in result.stdout


def test_padding_repeats_the_classes_up_to_whole_global_batches():
    assert padded_labels([3, 1, 4], 2) == [3, 1, 4, 3]
    assert padded_labels([3, 1, 4, 1, 5], 6) == [3, 1, 4, 1, 5, 3]
    assert padded_labels([7], 1) == [7]


def test_ranks_share_the_batches_of_one_process(gpt_ckpt, vq_ckpt):
    # the schedule of two ranks, run in this process: same rows as one process once merged by index
    from st_ar.models.gpt import GPT

    args = build_parser().parse_args(
        ["sample", "--ckpt", gpt_ckpt, *TINY, "--classes", "3,1,4,1,5", "--batch-size", "2", "--seed", "5"]
        + ["--out", "unused"]
    )
    model = GPT.from_checkpoint(gpt_ckpt, "GPT-debug", model_args=args.model_args).eval()
    vq = vq_ckpt[1]
    cpu = torch.device("cpu")
    settings = sample_settings(args)
    alone = sample_own_batches(model, vq, args.classes, settings, DistInfo(device=cpu))
    ranks = [sample_own_batches(model, vq, args.classes, settings, DistInfo(r, r, 2, cpu)) for r in (0, 1)]
    # one process pads 5 samples to 6, two to 8: rank 0 runs batches 0 and 2, rank 1 batches 1 and 3
    np.testing.assert_array_equal(alone[0], np.arange(6))
    np.testing.assert_array_equal(ranks[0][0], [0, 1, 4, 5])
    np.testing.assert_array_equal(ranks[1][0], [2, 3, 6, 7])
    codes, images = merge_parts(ranks[::-1], 5)  # the order of the parts does not matter
    np.testing.assert_array_equal(codes, alone[1][:5])
    np.testing.assert_array_equal(images, alone[2][:5])
    with pytest.raises(RuntimeError, match="missing"):
        merge_parts(ranks[:1], 5)


def test_stream_seeding_draws_the_batches_in_order_from_one_generator(gpt_ckpt, vq_ckpt, tmp_path):
    # the demo's and the ablation's way: no padding, the last batch short, one generator throughout
    from st_ar.models.gpt import GPT

    model = GPT.from_checkpoint(gpt_ckpt, "GPT-debug", model_args=json.loads(TINY[-1])).eval()
    vq = vq_ckpt[1]
    classes = [c for c in range(10) for _ in range(3)]  # 30 samples in batches of 8: 8, 8, 8, 6
    settings = SampleSettings(temperature=1.0, cfg_scale=1.5, batch_size=8, seed=4, seeding="stream")
    report = sample_to_files(model, vq, classes, tmp_path / "out", settings, grid=class_grid(10, 3, shown=2))
    assert report.samples == 30 and report.written == ["codes.npy", "samples.npz", "grid.png"]
    labels = torch.tensor(classes)
    expected, images = generate_images(
        model, vq, labels, batch_size=8, cfg_scale=1.5, generator=torch.Generator().manual_seed(4)
    )
    np.testing.assert_array_equal(np.load(tmp_path / "out" / "codes.npy"), expected.numpy())
    with np.load(tmp_path / "out" / "samples.npz") as z:
        np.testing.assert_array_equal(z["arr_0"], images)
        np.testing.assert_array_equal(z["labels"], classes)
    assert Image.open(tmp_path / "out" / "grid.png").size == (2 + 2 * 10, 2 + 10 * 10)  # 2 per class, a row each
    keep, nrow = class_grid(10, 3, shown=2)
    assert nrow == 2 and keep.tolist()[:4] == [0, 1, 3, 4]
    with pytest.raises(ValueError, match="one process only"):
        sample_to_files(model, vq, classes, tmp_path / "two", settings, DistInfo(0, 0, 2, torch.device("cpu")))
    with pytest.raises(ValueError, match="seeding must be one of"):
        SampleSettings(seeding="random")


@pytest.mark.dist
def test_torchrun_on_two_processes_writes_the_samples_of_one(gpt_ckpt, vq_ckpt, tmp_path):
    # 8 samples in batches of 3 (random sampling): one process pads them to 9, two processes to 12
    classes = [3, 1, 4, 1, 5, 9, 2, 6]
    flags = ["--ckpt", gpt_ckpt, *TINY, "--vq-ckpt", vq_ckpt[0], "--classes", ",".join(map(str, classes))]
    flags += ["--batch-size", "3", "--seed", "7", "--temperature", "1", "--device", "cpu"]
    one, two = tmp_path / "one", tmp_path / "two"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the subprocesses below: same kernels, same bits
    try:
        assert main(["sample", *flags, "--out", str(one)]) == 0
    finally:
        torch.set_num_threads(threads)
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    result = subprocess.run(
        [*launch, "-m", "st_ar.cli", "sample", *flags, "--out", str(two)],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert "8 samples in" in result.stdout and "on 2 processes" in result.stdout
    assert result.stdout.count("samples in") == 1  # rank 0 alone reports
    codes = np.load(two / "codes.npy")
    assert codes.shape == (8, 16)
    assert (one / "codes.npy").read_bytes() == (two / "codes.npy").read_bytes()
    with np.load(one / "samples.npz") as a, np.load(two / "samples.npz") as b:
        assert b["arr_0"].shape == (8, 8, 8, 3)
        assert a["arr_0"].tobytes() == b["arr_0"].tobytes()
        np.testing.assert_array_equal(b["labels"], classes)
    assert not (two / "parts").exists() and not (one / "parts").exists()
    assert (two / "grid.png").exists()


def test_one_device_rule_for_every_command(monkeypatch):
    from st_ar.distributed import resolve_device

    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("cuda") == torch.device("cuda")
    monkeypatch.setenv("LOCAL_RANK", "1")  # under torchrun a bare cuda is the rank's own GPU, not GPU 0
    assert resolve_device("cuda") == torch.device("cuda", 1)
    assert resolve_device("cuda:0") == torch.device("cuda", 0)  # an explicit index is kept
    if not torch.cuda.is_available():
        assert resolve_device("auto") == torch.device("cpu")


def test_shared_flags_are_the_same_in_every_command():
    """--device, --precision, --trust-checkpoint and --ckpt/--model/--model-args come from one definition."""
    parser = build_parser()
    commands = {
        "sample": ["sample", "--ckpt", "g.pt", "--classes", "1", "--out", "o"],
        "viz": ["viz", "attention", "--ckpt", "g.pt", "--codes", "c", "--out", "o"],
        "probe": ["eval", "probe", "--ckpt", "g.pt", "--train-codes", "a", "--test-codes", "b", "--out", "o"],
    }
    for name, argv in commands.items():
        args = parser.parse_args([*argv, "--device", "cpu", "--precision", "bf16", "--trust-checkpoint", *TINY])
        assert (args.device, args.precision, args.trust_checkpoint, args.model) == ("cpu", "bf16", True, "GPT-debug")
        assert args.model_args == {"vocab_size": 64, "block_size": 16, "num_classes": 10}, name
    for argv in (
        ["extract", "--dataset", "mnist", "--vq-ckpt", "v", "--image-size", "8", "--out", "o"],
        ["eval", "fid", "--samples", "s.npz", "--ref", "r"],
    ):
        assert parser.parse_args([*argv, "--device", "cpu"]).device == "cpu"
