"""VQ tokenizer: parity with LlamaGen's golden tensors, checkpoint layout, loading errors, shapes."""

from __future__ import annotations

import dataclasses
import os
import re

import pytest
import torch

from st_ar.models.loading import CheckpointError
from st_ar.models.vq import VQ_PRESETS, VQConfig, VQModel, explain

# --------------------------------------------------------------------------------------------------
# Parameter count computed from the architecture description, independently of the modules
# --------------------------------------------------------------------------------------------------


def _conv(cin: int, cout: int, k: int) -> int:
    return cin * cout * k * k + cout


def _norm(c: int) -> int:
    return 2 * c


def _res(cin: int, cout: int) -> int:
    shortcut = _conv(cin, cout, 1) if cin != cout else 0
    return _norm(cin) + _conv(cin, cout, 3) + _norm(cout) + _conv(cout, cout, 3) + shortcut


def _attn(c: int) -> int:
    return _norm(c) + 4 * _conv(c, c, 1)


def expected_param_count(cfg: VQConfig) -> int:
    n = _conv(cfg.in_channels, cfg.ch, 3)  # encoder
    prev, levels = cfg.ch, len(cfg.encoder_ch_mult)
    for i, m in enumerate(cfg.encoder_ch_mult):
        w = cfg.ch * m
        for j in range(cfg.num_res_blocks):
            n += _res(prev if j == 0 else w, w) + (_attn(w) if i == levels - 1 else 0)
        n += _conv(w, w, 3) if i < levels - 1 else 0
        prev = w
    n += 2 * _res(prev, prev) + _attn(prev) + _norm(prev) + _conv(prev, cfg.z_channels, 3)
    widths = [cfg.ch * m for m in reversed(cfg.decoder_ch_mult)]  # decoder, deepest first
    n += _conv(cfg.z_channels, widths[0], 3) + 2 * _res(widths[0], widths[0]) + _attn(widths[0])
    prev = widths[0]
    for i, w in enumerate(widths):
        for j in range(cfg.num_res_blocks + 1):
            n += _res(prev if j == 0 else w, w) + (_attn(w) if i == 0 else 0)
        n += _conv(w, w, 3) if i < levels - 1 else 0
        prev = w
    n += _norm(prev) + _conv(prev, 3, 3)
    d = cfg.codebook_embed_dim  # quantizer and the 1x1 convs around it
    return n + cfg.codebook_size * d + _conv(cfg.z_channels, d, 1) + _conv(d, cfg.z_channels, 1)


def _n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------------------------------
# Golden parity with LlamaGen
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def golden(vq_golden):
    return vq_golden


@pytest.fixture(scope="module")
def golden_fields(golden):
    return {k: v for k, v in golden["config"].items() if k != "derived"}


@pytest.fixture(scope="module")
def golden_model(golden, golden_fields, tmp_path_factory):
    path = tmp_path_factory.mktemp("vq") / "llamagen_vq_small.pt"
    torch.save(golden["checkpoint"], path)  # LlamaGen layout: {"model": state_dict}, no config
    # a LlamaGen file with a custom architecture: a preset name plus overrides of every field that differs
    return VQModel.from_checkpoint(path, "VQ-16", **golden_fields)


def test_golden_config_and_layout(golden, golden_fields, golden_model):
    derived = golden["config"]["derived"]
    cfg = VQConfig(**golden_fields)
    assert golden_model.config == cfg
    assert cfg.ch == derived["encoder_ch"] == derived["decoder_ch"]
    assert cfg.downsample_factor == derived["downsample_factor"]
    assert golden_model.quantize.codebook_used.shape == (derived["codebook_used_len"],)
    # same keys, in the same order, with the same shapes as the reference module
    ref = golden["checkpoint"]["model"]
    ours = VQModel(cfg).state_dict()
    assert list(ours) == list(ref)
    assert all(ours[k].shape == ref[k].shape for k in ref)
    assert _n_params(golden_model) == 14_915_339 == expected_param_count(cfg)
    assert not golden_model.training  # from_checkpoint returns eval mode


def test_golden_parity(golden, golden_model):
    model, image = golden_model, golden["image"]
    with torch.no_grad():
        encoder_output = model.encoder(image)
        pre_quant = model.quant_conv(encoder_output)
        torch.testing.assert_close(encoder_output, golden["encoder_output"], atol=5e-5, rtol=0)
        torch.testing.assert_close(pre_quant, golden["pre_quant"], atol=5e-5, rtol=0)
        torch.testing.assert_close(model.encode_latent(image), golden["pre_quant"], atol=5e-5, rtol=0)

        codes = model.encode(image)
        assert codes.dtype == torch.int64
        assert torch.equal(codes, golden["codes_grid"])
        assert torch.equal(codes.flatten(), golden["codes"])  # (b, h, w) row-major

        used_before = model.quantize.codebook_used.clone()
        out = model(image)
        assert torch.equal(out.quantizer.codes, golden["codes_grid"])
        torch.testing.assert_close(out.quantizer.z_q, golden["quant"], atol=1e-6, rtol=0)
        torch.testing.assert_close(out.reconstruction, golden["reconstruction"], atol=1e-4, rtol=0)
        assert torch.equal(model.quantize.codebook_used, used_before)  # eval mode leaves it alone

        b, c, h, w = golden["codes_shape"]  # LlamaGen's channel-first qzshape
        torch.testing.assert_close(model.decode(codes), golden["decoded_from_codes"], atol=1e-4, rtol=0)
        flat = golden["codes"].view(b, h * w)
        torch.testing.assert_close(model.decode(flat, grid=(h, w)), golden["decoded_from_codes"], atol=1e-4, rtol=0)


def test_llamagen_file_without_name_asks_for_preset(golden, tmp_path):
    path = tmp_path / "vq.pt"
    torch.save(golden["checkpoint"], path)
    with pytest.raises(CheckpointError, match="preset name"):
        VQModel.from_checkpoint(path)


def test_llamagen_file_with_wrong_preset_explains(golden, tmp_path):
    path = tmp_path / "vq.pt"
    torch.save(golden["checkpoint"], path)
    with pytest.raises(CheckpointError) as err:
        VQModel.from_checkpoint(path, "VQ-16")
    msg = str(err.value)
    assert "codebook size: file 32, model 16384" in msg
    assert "z_channels: file 64, model 256" in msg
    assert "encoder levels / widths: file 2 levels [128, 256], model 5 levels [128, 128, 256, 256, 512]" in msg
    assert "encoder_ch_mult=(1, 2)" in msg  # the hint names the overrides that fit


# --------------------------------------------------------------------------------------------------
# Real-size layout (meta device: no memory, no init cost)
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["VQ-16", "VQ-8"])
def test_real_size_layout(name, golden):
    cfg = VQConfig.from_name(name)
    with torch.device("meta"):
        model = VQModel(cfg)
    sd = model.state_dict()
    n = _n_params(model)
    print(f"{name}: {n:,} parameters")
    assert n == expected_param_count(cfg)
    assert 65e6 < n < 75e6  # LlamaGen reports about 72M for VQ-16

    # the golden key structure (2 levels) generalises to len(ch_mult) levels
    levels = len(cfg.encoder_ch_mult)

    def structure(keys, n_levels):
        # map each key to its role, with level indices replaced by "first" / "middle" / "last"
        def role(m):
            i = int(m.group(2))
            where = "first" if i == 0 else "last" if i == n_levels - 1 else "middle"
            return f"{m.group(1)}.conv_blocks.{where}."

        return {re.sub(r"^(encoder|decoder)\.conv_blocks\.(\d+)\.", role, k) for k in keys}

    # shortcut convs exist only where a level changes width, which depends on ch_mult: checked below
    golden_structure = {k for k in structure(golden["checkpoint"]["model"], 2) if "nin_shortcut" not in k}
    ours = {k for k in structure(sd, levels) if "nin_shortcut" not in k}
    assert golden_structure <= ours
    assert ours - golden_structure == {k for k in ours if ".middle." in k}  # levels between first and last
    enc_in = [cfg.ch] + [cfg.ch * m for m in cfg.encoder_ch_mult[:-1]]
    dec = [cfg.ch * m for m in reversed(cfg.decoder_ch_mult)]
    shortcuts = {f"encoder.conv_blocks.{i}" for i, m in enumerate(cfg.encoder_ch_mult) if enc_in[i] != cfg.ch * m}
    shortcuts |= {f"decoder.conv_blocks.{i}" for i in range(1, levels) if dec[i - 1] != dec[i]}
    assert {k.rsplit(".res.", 1)[0] for k in sd if "nin_shortcut" in k} == shortcuts
    assert all(".res.0.nin_shortcut" in k for k in sd if "nin_shortcut" in k)
    assert f"encoder.conv_blocks.{levels - 1}.attn.1.q.weight" in sd
    assert f"encoder.conv_blocks.{levels - 2}.downsample.conv.weight" in sd
    assert f"encoder.conv_blocks.{levels - 1}.downsample.conv.weight" not in sd
    assert "decoder.conv_blocks.0.attn.2.q.weight" in sd and "decoder.conv_blocks.1.attn.0.q.weight" not in sd
    assert f"decoder.conv_blocks.{levels - 1}.res.2.conv2.weight" in sd
    assert f"decoder.conv_blocks.{levels - 1}.upsample.conv.weight" not in sd

    shapes = {
        "encoder.conv_in.weight": (128, 3, 3, 3),
        "quantize.embedding.weight": (16384, 8),
        "encoder.conv_out.weight": (256, 512, 3, 3),
        "decoder.conv_in.weight": (512, 256, 3, 3),
        "quantize.codebook_used": (65536,),
        "quant_conv.weight": (8, 256, 1, 1),
        "post_quant_conv.weight": (256, 8, 1, 1),
        "decoder.conv_out.weight": (3, 128, 3, 3),
    }
    for key, shape in shapes.items():
        assert tuple(sd[key].shape) == shape, key
    if name == "VQ-16":
        assert cfg.downsample_factor == 16
        assert tuple(sd["encoder.conv_blocks.2.res.0.nin_shortcut.weight"].shape) == (256, 128, 1, 1)


# --------------------------------------------------------------------------------------------------
# Small model: shapes, loading errors, round trip, training path
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def debug_model():
    torch.manual_seed(0)
    return VQModel(VQConfig.from_name("VQ-debug")).eval()


def _images(b=2, h=16, w=16, seed=1):
    return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_encode_decode_shapes(debug_model):
    f = debug_model.config.downsample_factor
    assert f == 2
    codes = debug_model.encode(_images(2, 16, 24))
    assert codes.shape == (2, 8, 12) and codes.dtype == torch.int64
    assert 0 <= codes.min() and codes.max() < 64
    assert debug_model.decode(codes).shape == (2, 3, 16, 24)
    assert debug_model.decode(codes.flatten(1), grid=(8, 12)).shape == (2, 3, 16, 24)
    square = debug_model.encode(_images(3, 16, 16))
    out = debug_model.decode(square.flatten(1).int())  # (B, h*w) int32 codes: square grid inferred
    torch.testing.assert_close(out, debug_model.decode(square))
    with pytest.raises(ValueError, match="grid"):
        debug_model.decode(codes.flatten(1))  # 96 codes is not a square
    with pytest.raises(ValueError, match="grid"):
        debug_model.decode(codes.flatten(1), grid=(8, 8))
    with pytest.raises(ValueError, match="codebook"):
        debug_model.decode(torch.full((1, 4, 4), 64))
    with pytest.raises(ValueError, match="integers"):
        debug_model.decode(torch.zeros(1, 4, 4))


def test_non_divisible_image_size(debug_model):
    with pytest.raises(ValueError, match="not divisible by the downsample factor 2"):
        debug_model.encode(_images(1, 15, 16))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        debug_model.encode(torch.zeros(3, 16, 16))
    vq16 = VQConfig.from_name("VQ-16")
    with torch.device("meta"):
        model = VQModel(vq16)
    with pytest.raises(ValueError, match="divisible by the downsample factor 16"):
        model.encode(torch.zeros(1, 3, 264, 256, device="meta"))


def test_save_round_trip(debug_model, tmp_path):
    path = tmp_path / "sub" / "tok.pt"
    debug_model.save(path)
    assert sorted(os.listdir(path.parent)) == ["tok.pt"]  # no temporary file left behind
    raw = torch.load(path, weights_only=True)
    assert raw["kind"] == "st-ar-vq" and raw["config"] == dataclasses.asdict(debug_model.config)

    loaded = VQModel.from_checkpoint(path)  # our files need no name
    assert loaded.config == debug_model.config
    images = _images()
    with torch.no_grad():
        assert torch.equal(loaded.encode(images), debug_model.encode(images))
        assert torch.equal(loaded(images).reconstruction, debug_model(images).reconstruction)

    # overrides apply on top of the stored config (a dropout change keeps the shapes)
    assert VQModel.from_checkpoint(path, dropout_p=0.1).config.dropout_p == 0.1
    with pytest.raises(CheckpointError, match="codebook size: file 64, model 128"):
        VQModel.from_checkpoint(path, codebook_size=128)
    with pytest.raises(ValueError, match="unknown VQConfig field"):
        VQModel.from_checkpoint(path, codebook_sz=128)


def test_codebook_size_mismatch(debug_model, tmp_path):
    path = tmp_path / "llamagen.pt"
    torch.save({"model": debug_model.state_dict()}, path)
    with pytest.raises(CheckpointError) as err:
        VQModel.from_checkpoint(path, "VQ-debug", codebook_size=128)
    msg = str(err.value)
    assert "codebook size" in msg and "64" in msg and "128" in msg
    assert "codebook_size=64" in msg  # hint
    assert "quantize.embedding.weight" in msg  # load_strict's shape list

    # the explain function alone: no lines when the file fits
    assert explain(debug_model.state_dict(), debug_model.config) == []
    lines = explain(debug_model.state_dict(), VQConfig.from_name("VQ-debug", z_channels=64, ch=64))
    assert "z_channels: file 32, model 64" in lines and "base width (ch): file 32, model 64" in lines


def test_missing_and_unexpected_keys(debug_model, tmp_path):
    sd = debug_model.state_dict()
    del sd["decoder.conv_out.bias"]
    path = tmp_path / "missing.pt"
    torch.save({"model": sd}, path)
    with pytest.raises(CheckpointError, match=r"missing keys: decoder\.conv_out\.bias"):
        VQModel.from_checkpoint(path, "VQ-debug")

    # a file without the usage buffer is explained, and loads with codebook_show_usage=False
    sd = debug_model.state_dict()
    del sd["quantize.codebook_used"]
    path = tmp_path / "no_usage.pt"
    torch.save(sd, path)  # bare state dict (FSDP layout)
    with pytest.raises(CheckpointError, match="codebook_used buffer: file absent, model present"):
        VQModel.from_checkpoint(path, "VQ-debug")
    model = VQModel.from_checkpoint(path, "VQ-debug", codebook_show_usage=False)
    assert not hasattr(model.quantize, "codebook_used")


def test_checkpoint_of_another_kind(debug_model, tmp_path):
    path = tmp_path / "gpt.pt"
    torch.save({"model": debug_model.state_dict(), "config": {}, "kind": "st-ar-gpt"}, path)
    with pytest.raises(CheckpointError, match="not a VQ tokenizer"):
        VQModel.from_checkpoint(path)


def test_forward_training_path(tmp_path):
    torch.manual_seed(0)
    model = VQModel(VQConfig.from_name("VQ-debug", entropy_loss_ratio=0.1)).train()
    images = _images()
    rec, q = model(images)
    assert rec.shape == images.shape and q.z_q.shape == (2, 8, 8, 8) and q.codes.shape == (2, 8, 8)
    for loss in (q.codebook_loss, q.commit_loss, q.entropy_loss):
        assert loss.dim() == 0 and torch.isfinite(loss)
    torch.testing.assert_close(q.commit_loss, 0.25 * q.codebook_loss)  # same value, different gradients
    # the usage record got the newest codes at its end, in (b, h, w) order
    used = model.quantize.codebook_used
    assert torch.equal(used[-128:].long(), q.codes.flatten()) and used[:-128].abs().sum() == 0
    assert 0 < model.quantize.codebook_usage() <= 1

    total = (rec - images).pow(2).mean() + q.codebook_loss + q.commit_loss + q.entropy_loss
    total.backward()
    # straight-through: the reconstruction loss reaches the encoder; the codebook gets gradients too
    assert model.encoder.conv_in.weight.grad.abs().sum() > 0
    assert model.quantize.embedding.weight.grad.abs().sum() > 0
    assert model.decoder.conv_out.weight.grad.abs().sum() > 0

    # eval mode: no usage update, and encode never records usage
    before = used.clone()
    model.eval()
    with torch.no_grad():
        model(images)
    model.train()
    model.encode(images)
    assert torch.equal(model.quantize.codebook_used, before)


def test_config_validation():
    cfg = VQConfig(encoder_ch_mult=[1, 2], decoder_ch_mult=[1, 2])
    assert cfg.encoder_ch_mult == (1, 2) and cfg.downsample_factor == 2
    assert VQConfig().downsample_factor == 16 and VQConfig.from_name("VQ-8").downsample_factor == 8
    assert VQConfig.from_name("vq_16") == VQConfig.from_name("VQ-16") == VQConfig()
    assert set(VQ_PRESETS) >= {"VQ-16", "VQ-8", "VQ-mnist", "VQ-debug"}
    with pytest.raises(ValueError, match="VQ-16, VQ-8, VQ-debug"):
        VQConfig.from_name("VQ-32")
    with pytest.raises(ValueError, match="ch = 48"):
        VQConfig(ch=48)
    with pytest.raises(ValueError, match=r"decoder_ch_mult\[1\]"):
        VQConfig(ch=32, encoder_ch_mult=(1, 2), decoder_ch_mult=(1, 1.5))
    with pytest.raises(ValueError, match=r"encoder_ch_mult\[0\]"):
        VQConfig(encoder_ch_mult=(0, 2), decoder_ch_mult=(1, 2))
    with pytest.raises(ValueError, match="codebook_size"):
        VQConfig(codebook_size=0)
    with pytest.raises(ValueError, match="levels"):
        VQConfig(encoder_ch_mult=(1, 2), decoder_ch_mult=(1, 2, 2))
    with pytest.raises(ValueError, match="unknown VQConfig field"):
        VQConfig.from_name("VQ-16", channels=3)
