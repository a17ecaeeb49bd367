"""`st-ar sample` end to end on the golden GPT and a small tokenizer."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from st_ar.cli import main
from st_ar.models.vq import VQConfig, VQModel

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


@pytest.mark.parametrize("kind,flags", [("greedy", []), ("cfg", ["--cfg-scale", "2.5"])])
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
                *flags,
                "--batch-size",
                "2",
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


def test_console_script_is_installed(tmp_path):
    result = subprocess.run([sys.executable, "-m", "st_ar.cli", "sample", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "--cfg-interval" in result.stdout
