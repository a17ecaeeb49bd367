"""Loading LlamaGen GPT checkpoints as users have them, and refusing the ones that do not fit
(damaged files, the other model's files)."""

import argparse
import collections
import contextlib

import pytest
import torch
from test_gpt import golden_model

from st_ar.models.gpt import GPT
from st_ar.models.loading import CheckpointError
from st_ar.models.vq import VQConfig, VQModel

TINY_ARGS = {"vocab_size": 64, "block_size": 16, "num_classes": 10}


def load_tiny(path, **args):
    return GPT.from_checkpoint(path, "GPT-debug", model_args={**TINY_ARGS, **args}).eval()


def wrappings(sd):
    prefixed = {f"module.{k}": v for k, v in sd.items()}
    with_runtime = dict(sd)
    with_runtime["freqs_cis"] = torch.zeros(17, 16, 2)
    with_runtime["layers.0.attention.kv_cache.k_cache"] = torch.zeros(2, 4, 24, 32)
    with_runtime["layers.0.attention.kv_cache.v_cache"] = torch.zeros(2, 4, 24, 32)
    with_runtime["causal_mask"] = torch.ones(24, 24, dtype=torch.bool)
    released = {  # what LlamaGen's DDP trainer writes
        "model": sd,
        "optimizer": {"state": {0: {"step": torch.tensor(3.0)}}, "param_groups": [{"lr": 1e-4, "params": [0]}]},
        "steps": 1000,
        "args": argparse.Namespace(gpt_model="GPT-debug", image_size=64, downsample_size=16, vocab_size=64),
    }
    return {
        "model": {"model": sd},
        "module": {"module": sd},
        "state_dict": {"state_dict": sd},
        "bare (FSDP)": sd,
        "ddp prefix": {"model": prefixed},
        "runtime tensors": {"model": with_runtime},
        "released with args": released,
    }


@pytest.mark.parametrize("kind", list(wrappings({})))
def test_llamagen_checkpoint_wrappings_load_and_match(gpt_golden, tmp_path, kind):
    sd = gpt_golden["checkpoint"]["model"]
    path = tmp_path / "ckpt.pt"
    torch.save(wrappings(sd)[kind], path)
    model = load_tiny(path)
    out = model(gpt_golden["idx"], gpt_golden["cond_idx"]).logits
    torch.testing.assert_close(out, gpt_golden["logits_eval"], atol=1e-5, rtol=0)


def save_golden(gpt_golden, tmp_path, **extra):
    path = tmp_path / "ckpt.pt"
    torch.save({"model": gpt_golden["checkpoint"]["model"], **extra}, path)
    return path


def test_vocabulary_mismatch_names_both_sizes(gpt_golden, tmp_path):
    path = save_golden(gpt_golden, tmp_path)
    with pytest.raises(CheckpointError, match="vocabulary size: file 64 vs model 32"):
        load_tiny(path, vocab_size=32)


def test_depth_and_class_mismatch_are_named(gpt_golden, tmp_path):
    path = save_golden(gpt_golden, tmp_path)
    with pytest.raises(CheckpointError, match="number of layers: file 2 vs model 3"):
        load_tiny(path, n_layer=3)
    with pytest.raises(CheckpointError, match="number of classes: file 10 vs model 1000"):
        load_tiny(path, num_classes=1000)
    with pytest.raises(CheckpointError, match="width"):
        GPT.from_checkpoint(path, "GPT-B")


def test_grid_mismatch_told_from_training_args(gpt_golden, tmp_path):
    # trained at 384 px with a 16x downsampling tokenizer: 24x24 tokens, not 4x4
    args = argparse.Namespace(image_size=384, downsample_size=16)
    path = save_golden(gpt_golden, tmp_path, args=args)
    with pytest.raises(CheckpointError, match="token grid: file trained at 384 px / 16 = 24x24"):
        load_tiny(path)


def test_grid_mismatch_told_from_stored_rope_table(gpt_golden, tmp_path):
    sd = dict(gpt_golden["checkpoint"]["model"], freqs_cis=torch.zeros(26, 16, 2))  # 1 + 5x5
    path = tmp_path / "ckpt.pt"
    torch.save({"model": sd}, path)
    with pytest.raises(CheckpointError, match="RoPE table has 26 rows"):
        load_tiny(path)


def test_head_count_mismatch_told_from_kv_cache(gpt_golden, tmp_path):
    sd = dict(gpt_golden["checkpoint"]["model"])
    sd["layers.0.attention.kv_cache.k_cache"] = torch.zeros(1, 8, 24, 16)
    path = tmp_path / "ckpt.pt"
    torch.save({"model": sd}, path)
    with pytest.raises(CheckpointError, match="attention heads: file's KV cache has 8, model 4"):
        load_tiny(path)


def test_missing_weights_are_listed(gpt_golden, tmp_path):
    sd = {k: v for k, v in gpt_golden["checkpoint"]["model"].items() if k != "norm.weight"}
    path = tmp_path / "ckpt.pt"
    torch.save(sd, path)
    with pytest.raises(CheckpointError, match="missing keys: norm.weight"):
        load_tiny(path)


class Payload:  # an arbitrary class: weights_only loading must refuse it
    pass


def test_untrusted_objects_are_refused_unless_trusted(gpt_golden, tmp_path):
    path = save_golden(gpt_golden, tmp_path, extra=Payload())
    with pytest.raises(CheckpointError, match="(?s)outside the safe set.*Payload.*trust=True"):
        load_tiny(path)
    with pytest.warns(UserWarning, match="unrestricted"):
        model = GPT.from_checkpoint(path, "GPT-debug", model_args=TINY_ARGS, trust=True)
    assert isinstance(model, GPT)


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        GPT.from_checkpoint(tmp_path / "nope.pt", "GPT-B")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match="junk.pt"):
        GPT.from_checkpoint(junk, "GPT-B")
    odd = tmp_path / "odd.pt"
    torch.save({"weights": collections.OrderedDict(), "epoch": 3}, odd)
    with pytest.raises(CheckpointError, match="no state dict found"):
        GPT.from_checkpoint(odd, "GPT-B")


def test_llamagen_file_without_a_name_asks_for_one(gpt_golden, tmp_path):
    path = save_golden(gpt_golden, tmp_path)
    with pytest.raises(CheckpointError, match="pass the preset name"):
        GPT.from_checkpoint(path)


def test_own_checkpoint_round_trip_needs_no_architecture(gpt_golden, tmp_path):
    model = golden_model(gpt_golden)
    model.save(tmp_path / "own.pt", step=5)
    assert [p.name for p in tmp_path.iterdir()] == ["own.pt"]  # atomic write leaves nothing behind
    loaded = GPT.from_checkpoint(tmp_path / "own.pt").eval()
    assert loaded.config == model.config
    torch.testing.assert_close(loaded(gpt_golden["idx"], gpt_golden["cond_idx"]).logits, gpt_golden["logits_eval"])
    with pytest.raises(CheckpointError, match="another architecture"):
        GPT.from_checkpoint(tmp_path / "own.pt", "GPT-debug", model_args={**TINY_ARGS, "vocab_size": 128})


def own_files(gpt_golden, tmp_path):
    """Our GPT and VQ checkpoint files, as the two loaders read them."""
    gpt, vq = tmp_path / "gpt.pt", tmp_path / "vq.pt"
    golden_model(gpt_golden).save(gpt)
    VQModel(VQConfig.from_name("VQ-debug")).save(vq)
    return {"gpt": (gpt, GPT.from_checkpoint), "vq": (vq, VQModel.from_checkpoint)}


@pytest.mark.parametrize("which", ["gpt", "vq"])
@pytest.mark.parametrize("trust", [False, True])
def test_empty_and_truncated_files_are_named_as_such(gpt_golden, tmp_path, which, trust):
    path, load = own_files(gpt_golden, tmp_path)[which]
    load(path)  # the whole file loads
    data = path.read_bytes()
    cut = tmp_path / "cut.pt"
    for size, expected in [(0, r"is empty \(0 bytes\): it was not written completely")] + [
        (n, rf"is truncated \({n} bytes") for n in (2, 4, 100, len(data) // 2, len(data) - 1)
    ]:
        cut.write_bytes(data[:size])
        with pytest.raises(CheckpointError, match=f"cut.pt {expected}"):
            load(cut, trust=trust)  # told before unpickling, so trust changes nothing


@pytest.mark.parametrize("trust", [False, True])
def test_damaged_files_of_the_old_format_are_not_checkpoints(gpt_golden, tmp_path, trust):
    # the legacy (non-zip) torch.save format has no index at its end: torch.load finds the cut
    path = tmp_path / "legacy.pt"
    torch.save({"model": gpt_golden["checkpoint"]["model"]}, path, _use_new_zipfile_serialization=False)
    assert isinstance(load_tiny(path), GPT)
    data = path.read_bytes()
    cut = tmp_path / "cut.pt"
    for size in (1, 10, len(data) // 2, len(data) - 1):
        cut.write_bytes(data[:size])
        with pytest.warns(UserWarning) if trust else contextlib.nullcontext():
            with pytest.raises(CheckpointError, match=r"cut.pt is not a readable torch checkpoint \(truncated"):
                GPT.from_checkpoint(cut, "GPT-debug", model_args=TINY_ARGS, trust=trust)
    for junk in (b"hello world, not a checkpoint", bytes(range(256))):
        cut.write_bytes(junk)
        with pytest.raises(CheckpointError, match="cut.pt is not a readable torch checkpoint"):
            VQModel.from_checkpoint(cut, "VQ-debug")
    with pytest.raises(CheckpointError, match="is a folder"):
        GPT.from_checkpoint(tmp_path, "GPT-debug")


def test_a_vq_checkpoint_is_not_taken_for_a_gpt(gpt_golden, tmp_path):
    vq_path = own_files(gpt_golden, tmp_path)["vq"][0]
    llamagen_vq = tmp_path / "llamagen_vq.pt"
    torch.save({"model": VQModel(VQConfig.from_name("VQ-debug")).state_dict(), "steps": 10}, llamagen_vq)
    for path in (vq_path, llamagen_vq):
        for args in ({}, {"name": "GPT-debug", "model_args": TINY_ARGS}):
            with pytest.raises(CheckpointError, match=f"{path.name} is a VQ tokenizer checkpoint, not a GPT.*vq-ckpt"):
                GPT.from_checkpoint(path, **args)


def test_a_gpt_checkpoint_is_not_taken_for_a_vq(gpt_golden, tmp_path):
    gpt_path = own_files(gpt_golden, tmp_path)["gpt"][0]
    llamagen_gpt = save_golden(gpt_golden, tmp_path)
    bare = tmp_path / "bare.pt"
    torch.save({f"module.{k}": v for k, v in gpt_golden["checkpoint"]["model"].items()}, bare)
    for path in (gpt_path, llamagen_gpt, bare):
        for name in (None, "VQ-debug"):
            with pytest.raises(CheckpointError, match=f"{path.name} is a GPT checkpoint, not a VQ tokenizer"):
                VQModel.from_checkpoint(path, name)
