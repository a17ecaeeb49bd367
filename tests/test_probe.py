"""Linear probe: per-step feature extraction (null class, position t) and the BatchNorm + Linear head."""

import json

import pytest
import torch

from st_ar.cli import main
from st_ar.data import extract_codes, open_dataset
from st_ar.eval.probe import default_steps, extract_step_features, first_view_codes, train_linear_probe
from st_ar.models.gpt import GPT, GPTConfig
from st_ar.models.vq import VQConfig, VQModel


def tiny_gpt(**kw) -> GPT:
    return GPT(GPTConfig.from_name("GPT-debug", vocab_size=32, block_size=16, num_classes=5, **kw)).eval()


def test_default_steps():
    assert default_steps(256) == [32, 64, 96, 128, 160, 192, 224, 256]
    assert default_steps(16, 4) == [4, 8, 12, 16]
    assert default_steps(64)[-1] == 64
    with pytest.raises(ValueError):
        default_steps(4, 8)


def test_probe_separates_separable_classes():
    g = torch.Generator().manual_seed(1)
    means = torch.randn(4, 16, generator=g) * 3  # (classes, dim)

    def split(n):
        y = torch.arange(n) % 4
        return means[y] + 0.3 * torch.randn(n, 16, generator=g), y

    (xa, ya), (xb, yb) = split(400), split(200)
    acc = train_linear_probe(xa, ya, xb, yb, epochs=4, lr=0.1, batch_size=100, seed=0)
    assert acc > 0.99
    # the same seed gives the same probe
    assert acc == train_linear_probe(xa, ya, xb, yb, epochs=4, lr=0.1, batch_size=100, seed=0)


def test_probe_on_random_labels_is_near_chance():
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(600, 8, generator=g), torch.randint(0, 4, (600,), generator=g)
    acc = train_linear_probe(x[:400], y[:400], x[400:], y[400:], epochs=5, batch_size=64)
    assert acc < 0.45


def test_step_features_are_positions_of_a_null_class_forward():
    model = tiny_gpt()
    codes = torch.randint(0, 32, (5, 16))
    labels = torch.tensor([0, 1, 2, 3, 4])
    steps = [0, 4, 8, 16]
    feats, out_labels = extract_step_features(model, codes, steps, layer=1, batch_size=2, labels=labels, progress=False)
    assert out_labels is labels
    null = torch.full((5,), model.config.null_class)
    with torch.no_grad():
        hidden = model(codes, null, return_hidden=(1,), logits=False).hidden[1]  # (5, 17, dim)
    for s in steps:
        assert feats[s].shape == (5, model.config.dim) and feats[s].dtype == torch.float32
        torch.testing.assert_close(feats[s], hidden[:, s], rtol=1e-5, atol=1e-5)
    # a true-label forward differs (so the test above would notice a leak), the features do not depend on it
    with torch.no_grad():
        labelled = model(codes, labels, return_hidden=(1,), logits=False).hidden[1]
    assert not torch.allclose(labelled[:, 4], feats[4])
    other, _ = extract_step_features(model, codes, steps, 1, labels=(labels + 1) % 5, progress=False)
    for s in steps:
        torch.testing.assert_close(other[s], feats[s])
    with pytest.raises(ValueError):
        extract_step_features(model, codes, [17], 1, progress=False)


@pytest.fixture(scope="module")
def codes_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("probe")
    torch.manual_seed(0)
    VQModel(VQConfig.from_name("VQ-debug")).save(root / "vq.pt")
    extract_codes(
        open_dataset("mnist", "train"), root / "vq.pt", root / "codes", image_size=16, limit=64, progress=False
    )
    return root


def test_probe_cli_writes_json_and_plot(codes_folder, capsys):
    codes = codes_folder / "codes"
    first, labels = first_view_codes(codes)
    assert first.shape == (64, 64) and labels.shape == (64,)
    for i, name in enumerate(["a", "b"]):
        torch.manual_seed(i)
        GPT(GPTConfig.from_name("GPT-debug", vocab_size=64, block_size=64, num_classes=10)).save(
            codes_folder / f"{name}.pt"
        )
    out = codes_folder / "out"
    argv = [
        "eval",
        "probe",
        "--ckpt",
        str(codes_folder / "a.pt"),
        "--ckpt",
        str(codes_folder / "b.pt"),
        "--label",
        "base",
        "--train-codes",
        str(codes),
        "--test-codes",
        str(codes),
        "--steps",
        "16,64",
        "--epochs",
        "2",
        "--device",
        "cpu",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    report = json.loads((out / "probe.json").read_text())
    assert set(report["models"]) == {"base", "b"}
    assert report["models"]["base"]["layer"] == 1
    assert set(report["models"]["b"]["accuracy"]) == {"16", "64"}
    assert all(0 <= a <= 1 for a in report["models"]["b"]["accuracy"].values())
    assert (out / "probe.png").stat().st_size > 0
