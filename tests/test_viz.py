"""Analysis tools: attention maps, locality, token agreement of two views, the viz command."""

import json

import numpy as np
import pytest
import torch

from st_ar.cli import main
from st_ar.data import extract_codes, open_dataset
from st_ar.eval.viz import (
    attention_maps,
    causal_neighbours,
    locality_summary,
    mean_locality,
    mean_token_agreement,
    neighbour_mask,
    query_heatmap,
    render_attention,
    render_views,
    token_agreement,
)
from st_ar.models.gpt import GPT, GPTConfig
from st_ar.models.vq import VQConfig, VQModel


def test_attention_rows_sum_to_one_and_are_causal():
    model = GPT(GPTConfig.from_name("GPT-debug", vocab_size=32, block_size=16, num_classes=5)).eval()
    attn = attention_maps(model, torch.randint(0, 32, (2, 16)), torch.tensor([1, 5]), block=2)
    assert attn.shape == (2, 4, 16, 16)  # [class, x_0 .. x_14]
    torch.testing.assert_close(attn.sum(-1), torch.ones(2, 4, 16))
    future = torch.ones(16, 16, dtype=torch.bool).triu(1)
    assert attn[..., future].abs().max() == 0


def test_causal_neighbours_on_4x4_grid():
    g = (4, 4)
    assert causal_neighbours(0, g) == []
    assert causal_neighbours(3, g) == [2]
    assert causal_neighbours(4, g) == [0, 1]
    assert causal_neighbours(5, g) == [0, 1, 2, 4]
    assert causal_neighbours(7, g) == [2, 3, 6]
    mask = neighbour_mask(g)  # query q predicts cell q; key k holds cell k - 1
    assert mask.shape == (16, 16)
    assert mask[5].nonzero().flatten().tolist() == [1, 2, 3, 5]
    assert not mask.triu(1).any() and not mask[:, 0].any()


def test_locality_against_hand_computed_example():
    g = (2, 2)  # T = 4; sequence [class, x_0, x_1, x_2]
    attn = torch.tensor(
        [
            [1.0, 0.0, 0.0, 0.0],
            [0.5, 0.5, 0.0, 0.0],  # predicts cell 1: neighbour cell 0 (key 1)
            [0.2, 0.3, 0.5, 0.0],  # predicts cell 2: neighbours cells 0, 1 (keys 1, 2)
            [0.1, 0.2, 0.3, 0.4],  # predicts cell 3: neighbours cells 0, 1, 2 (keys 1, 2, 3)
        ]
    )[None, None]
    s = locality_summary(attn.expand(3, 2, 4, 4), g)
    assert s["neighbour_mass"] == pytest.approx((0.5 + 0.8 + 0.9) / 3)
    assert s["class_mass"] == pytest.approx((0.5 + 0.2 + 0.1) / 3)
    assert s["uniform_neighbour_mass"] == pytest.approx((1 / 2 + 2 / 3 + 3 / 4) / 3)
    assert s["neighbour_mass_per_head"] == pytest.approx([(0.5 + 0.8 + 0.9) / 3] * 2)
    heat, cls = query_heatmap(attn[0, 0, 2], 2, g)
    assert cls == pytest.approx(0.2)
    np.testing.assert_allclose(heat, [[0.3, 0.5], [0.0, 0.0]])


def test_token_agreement():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 1000, size=(8, 8))
    assert token_agreement(a, a) == (1.0, (0, 0))
    assert token_agreement(a, a, max_shift=2) == (1.0, (0, 0))
    b = np.roll(a, -1, axis=1)  # b[y, x] = a[y, x + 1]: the crop moved one token right
    b[:, -1] = rng.integers(1000, 2000, size=8)  # new content entering the crop
    plain, _ = token_agreement(a, b)
    assert plain < 0.2
    best, shift = token_agreement(a, b, max_shift=1)
    assert best == 1.0 and shift == (0, -1)
    with pytest.raises(ValueError):
        token_agreement(a, b[:4])


def test_averages_over_images_weigh_every_image_alike():
    rng = np.random.default_rng(1)
    a = rng.integers(0, 50, size=(3, 16))
    flipped = a.reshape(3, 4, 4)[:, :, ::-1].reshape(3, 16)
    m = mean_token_agreement(a, flipped, (4, 4), max_shift=1, mirror=True)
    expected = np.mean([token_agreement(x.reshape(4, 4), y.reshape(4, 4))[0] for x, y in zip(a, flipped)])
    assert m["agreement_same_position"] == pytest.approx(expected) and m["agreement_mirrored_best_shift"] == 1.0
    assert mean_token_agreement(a, a, (4, 4), max_shift=0, mirror=False)["agreement_mirrored_best_shift"] is None

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50, block_size=16, num_classes=10, n_layer=2, n_head=2, dim=32)).eval()
    codes, labels = torch.from_numpy(a), torch.tensor([1, 2, 3])
    in_batches, count = mean_locality(model, codes, labels, 2, (4, 4), batch_size=2)  # batches of 2 and 1
    at_once = locality_summary(attention_maps(model, codes, labels, 2), (4, 4))
    assert count == 3 and in_batches["neighbour_mass"] == pytest.approx(at_once["neighbour_mass"], abs=1e-6)
    assert in_batches["class_mass_per_head"] == pytest.approx(at_once["class_mass_per_head"], abs=1e-6)


def test_renderers_write_pngs(tmp_path):
    attn = torch.rand(2, 16, 16).tril()
    attn = attn / attn.sum(-1, keepdim=True)
    image = np.zeros((32, 32, 3), dtype=np.uint8)
    render_attention(attn, [3, 15], (4, 4), tmp_path / "a.png", image=image, per_head=True)
    grid = np.arange(16).reshape(4, 4)
    render_views(grid, grid[:, ::-1], {4: 0.5, 16: 0.7}, tmp_path / "v.png", vocab_size=16)
    assert (tmp_path / "a.png").stat().st_size > 0 and (tmp_path / "v.png").stat().st_size > 0


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("viz")
    torch.manual_seed(0)
    VQModel(VQConfig.from_name("VQ-debug")).save(root / "vq.pt")
    extract_codes(
        open_dataset("mnist", "train"), root / "vq.pt", root / "codes", image_size=16, limit=16, progress=False
    )
    GPT(GPTConfig.from_name("GPT-debug", vocab_size=64, block_size=64, num_classes=10)).save(root / "gpt.pt")
    return root


def test_viz_commands(folder):
    common = [
        "--ckpt",
        str(folder / "gpt.pt"),
        "--codes",
        str(folder / "codes"),
        "--num-images",
        "4",
        "--device",
        "cpu",
    ]
    out = folder / "att"
    assert main(["viz", "attention", *common, "--vq-ckpt", str(folder / "vq.pt"), "--per-head", "--out", str(out)]) == 0
    s = json.loads((out / "attention.json").read_text())
    assert 0 <= s["neighbour_mass"] <= 1 and 0 <= s["class_mass"] <= 1 and s["num_images"] == 4
    assert (out / "attention.png").stat().st_size > 0
    out = folder / "views"
    assert main(["viz", "views", *common, "--view-b", "5", "--steps", "16,64", "--out", str(out)]) == 0
    r = json.loads((out / "views.json").read_text())
    assert r["agreement_best_shift"] >= r["agreement_same_position"]
    assert r["agreement_mirrored_best_shift"] is not None  # view 5 is a flip of view 0
    assert set(r["feature_cosine"]) == {"16", "64"}
    assert (out / "views.png").stat().st_size > 0
