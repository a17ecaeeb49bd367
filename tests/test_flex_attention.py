"""FlexAttention for the masked student against the dense SDPA mask.

On CPU this torch runs FlexAttention forward only (no backward), and only fused under
torch.compile, which takes tens of seconds to compile its kernel: the CPU tests therefore run
the unfused eager reference of flex_attention (same BlockMask, same semantics), and the
gradient test and the compiled kernel run on CUDA.
"""

import pytest
import torch

import st_ar.models.layers as layers
from st_ar.models.gpt import GPT, GPTConfig
from st_ar.objectives.masks import key_masked_block_mask, key_masked_causal_mask, sample_hidden_keys
from st_ar.sampling import KVCache

needs_flex = pytest.mark.skipif(not layers.flex_available(), reason="FlexAttention needs torch >= 2.5")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention backward runs on CUDA only")


@pytest.fixture
def eager_flex(monkeypatch):
    # the unfused reference instead of the compiled kernel: seconds instead of a long CPU compile
    monkeypatch.setattr(layers, "_compiled_flex_attention", lambda: layers.flex_attention)
    monkeypatch.setattr(torch.nn.attention.flex_attention, "_warn_once", lambda *a, **k: None, raising=False)


def masked_model(device="cpu", **overrides) -> GPT:
    torch.manual_seed(0)
    config = GPTConfig.from_name("GPT-debug", vocab_size=32, block_size=64, num_classes=5, **overrides)
    model = GPT(config).to(device).eval()
    torch.nn.init.normal_(model.output.weight, std=0.05)
    return model


def batch(device="cpu", B=3, S=64):
    gen = torch.Generator().manual_seed(1)
    idx = torch.randint(0, 32, (B, S - 1), generator=gen).to(device)
    cond = torch.tensor([0, 3, 4][:B]).to(device)
    hidden = sample_hidden_keys(B, S, 0.25, generator=gen).to(device)
    return idx, cond, hidden


@needs_flex
@pytest.mark.parametrize("form", ["dense", "block"])
@torch.no_grad()  # no FlexAttention backward on CPU
def test_flex_forward_matches_sdpa_with_the_key_mask(eager_flex, form):
    model = masked_model()
    idx, cond, hidden = batch()
    dense = key_masked_causal_mask(hidden)
    ref = model(idx, cond, attn_mask=dense, attention="sdpa", return_hidden=(1, 2))
    mask = dense if form == "dense" else key_masked_block_mask(hidden)
    out = model(idx, cond, attn_mask=mask, attention="flex", return_hidden=(1, 2))
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.hidden[2], ref.hidden[2], atol=1e-5, rtol=0)
    # unmasked flex is causal attention; grouped k/v heads go through the same path
    torch.testing.assert_close(model(idx, cond, attention="flex").logits, model(idx, cond).logits, atol=1e-5, rtol=0)
    gqa = masked_model(n_kv_head=2)
    torch.testing.assert_close(
        gqa(idx, cond, attn_mask=mask, attention="flex").logits,
        gqa(idx, cond, attn_mask=dense, attention="sdpa").logits,
        atol=1e-5,
        rtol=0,
    )


@needs_flex
@torch.no_grad()
def test_model_setting_selects_the_backend(eager_flex, monkeypatch):
    model = masked_model()
    idx, cond, hidden = batch()
    dense = key_masked_causal_mask(hidden)
    calls = []
    real = layers.run_flex_attention
    monkeypatch.setattr(layers, "run_flex_attention", lambda *a: calls.append(1) or real(*a))
    model(idx, cond, attn_mask=dense)  # "auto" on CPU: SDPA, nothing changes here
    assert calls == []
    model.attention_backend = "flex"
    model(idx, cond, attn_mask=dense)
    assert len(calls) == 2  # both layers
    model(idx, cond, attn_mask=dense, attention="sdpa")  # the per-call argument wins
    assert len(calls) == 2


def test_auto_resolution_and_refusals():
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert layers.resolve_attention_backend("auto", cpu, masked=True) == "sdpa"
    assert layers.resolve_attention_backend("auto", gpu, masked=False) == "sdpa"  # causal: flash kernel
    expected = "flex" if layers.flex_available() else "sdpa"
    assert layers.resolve_attention_backend("auto", gpu, masked=True) == expected
    with pytest.raises(ValueError, match="attention backend must be one of"):
        layers.resolve_attention_backend("xformers", cpu, masked=True)
    model = masked_model()
    idx, cond, hidden = batch()
    with pytest.raises(ValueError, match="attention must be one of"):
        model(idx, cond, attention="flash")
    if layers.flex_available():
        block = key_masked_block_mask(hidden)
        with pytest.raises(ValueError, match="full-sequence forwards only"):
            model(idx, cond, attn_mask=block, return_attention=(1,))
        with pytest.raises(ValueError, match="full-sequence forwards only"):
            model(idx[:, :4], cond, attn_mask=block, kv_cache=KVCache.for_model(model, 3))


@needs_flex
@cuda
def test_flex_outputs_and_gradients_match_sdpa_on_cuda():
    model = masked_model("cuda")  # eval: no dropout, so both backends see the same computation
    idx, cond, hidden = batch("cuda", S=64)
    dense = key_masked_causal_mask(hidden)
    results = {}
    for backend in ("sdpa", "flex"):
        model.zero_grad()
        out = model(idx, cond, attn_mask=dense, attention=backend, return_hidden=(2,))
        (out.logits.square().mean() + out.hidden[2].square().mean()).backward()
        results[backend] = (out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
    torch.testing.assert_close(results["flex"][0], results["sdpa"][0], atol=1e-5, rtol=0)
    for name, grad in results["sdpa"][1].items():
        torch.testing.assert_close(results["flex"][1][name], grad, atol=1e-5, rtol=1e-4, msg=name)
    # the structured BlockMask gives the same as the one built from the dense mask
    block = model(idx, cond, attn_mask=key_masked_block_mask(hidden)).logits
    torch.testing.assert_close(block, results["sdpa"][0], atol=1e-5, rtol=0)
