"""The GPT against LlamaGen's golden tensors and against properties that fail if it were wrong."""

import math

import pytest
import torch
import torch.nn.functional as F

from st_ar.models.gpt import GPT, GPT_PRESETS, GPTConfig, drop_labels
from st_ar.models.layers import Linear, apply_rope, rope_2d_table
from st_ar.objectives.masks import key_masked_causal_mask
from st_ar.sampling import KVCache


def golden_model(golden, train=False) -> GPT:
    config = GPTConfig.from_model_args({k: v for k, v in golden["config"].items() if k != "derived"})
    model = GPT(config)
    model.load_state_dict(golden["checkpoint"]["model"])
    return model.train(train)


def test_rope_table_matches_golden(gpt_golden):
    table = rope_2d_table(head_dim=32, grid=4, cls_token_num=1)
    torch.testing.assert_close(table, gpt_golden["freqs_cis"], atol=1e-6, rtol=0)
    assert table[0].abs().sum() == 0  # class slot: cos = sin = 0


def test_rope_table_against_formula():
    head_dim, grid, base = 16, 3, 10000.0
    table = rope_2d_table(head_dim, grid, 1, base)
    quarter = head_dim // 4
    for p in range(grid * grid):
        r, c = divmod(p, grid)
        for j in range(head_dim // 2):
            pos, jj = (r, j) if j < quarter else (c, j - quarter)
            angle = pos * base ** (-4 * jj / head_dim)
            assert table[1 + p, j, 0].item() == pytest.approx(math.cos(angle), abs=1e-6)
            assert table[1 + p, j, 1].item() == pytest.approx(math.sin(angle), abs=1e-6)


def test_apply_rope_rotates_adjacent_pairs():
    x = torch.randn(1, 2, 1, 4)
    table = torch.zeros(2, 2, 2)
    table[1, :, 0], table[1, :, 1] = math.cos(0.3), math.sin(0.3)
    out = apply_rope(x, table)
    assert out[0, 0].abs().sum() == 0  # zero row zeroes the vector
    x0, x1 = x[0, 1, 0, 0], x[0, 1, 0, 1]
    assert out[0, 1, 0, 0].item() == pytest.approx((x0 * math.cos(0.3) - x1 * math.sin(0.3)).item(), abs=1e-6)
    assert out[0, 1, 0, 1].item() == pytest.approx((x1 * math.cos(0.3) + x0 * math.sin(0.3)).item(), abs=1e-6)


def test_train_forward_and_loss_match_golden(gpt_golden):
    model = golden_model(gpt_golden, train=True)
    assert not gpt_golden["train_label_drop_mask"].any()
    out = model(gpt_golden["idx"], gpt_golden["cond_idx"])
    torch.testing.assert_close(out.logits, gpt_golden["logits_train"], atol=1e-5, rtol=0)
    loss = F.cross_entropy(out.logits.flatten(0, 1), gpt_golden["targets"].flatten())
    assert loss.item() == pytest.approx(gpt_golden["loss_train"], rel=1e-6)


def test_eval_forward_matches_golden(gpt_golden):
    model = golden_model(gpt_golden)
    out = model(gpt_golden["idx"], gpt_golden["cond_idx"])
    torch.testing.assert_close(out.logits, gpt_golden["logits_eval"], atol=1e-5, rtol=0)


def test_kv_cache_decode_matches_golden_and_full_forward(gpt_golden):
    model = golden_model(gpt_golden)
    idx, cond = gpt_golden["idx"], gpt_golden["cond_idx"]
    cache = KVCache.for_model(model, batch_size=3)
    steps = [model(idx[:, :0], cond, kv_cache=cache).logits]
    for t in range(idx.shape[1]):
        steps.append(model(idx[:, t : t + 1], kv_cache=cache, start_pos=1 + t).logits)
    cached = torch.cat(steps, dim=1)
    torch.testing.assert_close(cached, gpt_golden["logits_kvcache"], atol=1e-5, rtol=0)
    torch.testing.assert_close(cached, model(idx, cond).logits, atol=1e-5, rtol=0)


def test_kv_cache_chunked_prefill_equals_full_forward():
    model = GPT(GPTConfig.from_name("GPT-debug", vocab_size=32, block_size=16, num_classes=5)).eval()
    torch.nn.init.normal_(model.output.weight, std=0.05)
    idx, cond = torch.randint(0, 32, (2, 15)), torch.tensor([1, 4])
    cache = KVCache.for_model(model, batch_size=2)
    first = model(idx[:, :6], cond, kv_cache=cache).logits  # positions 0..6
    rest = model(idx[:, 6:], kv_cache=cache, start_pos=7).logits  # positions 7..15
    torch.testing.assert_close(torch.cat([first, rest], 1), model(idx, cond).logits, atol=1e-5, rtol=0)


def test_causality_future_tokens_do_not_change_past_logits():
    model = GPT(GPTConfig.from_name("GPT-debug", vocab_size=32, block_size=16, num_classes=5)).eval()
    torch.nn.init.normal_(model.output.weight, std=0.05)
    idx, cond = torch.randint(0, 32, (2, 15)), torch.tensor([0, 3])
    changed = idx.clone()
    changed[:, 9:] = (changed[:, 9:] + 1) % 32
    a, b = model(idx, cond).logits, model(changed, cond).logits
    torch.testing.assert_close(a[:, :10], b[:, :10])
    assert (a[:, 10:] - b[:, 10:]).abs().max() > 1e-4


def test_return_hidden_and_headless_forward():
    model = GPT(GPTConfig.from_name("GPT-debug", vocab_size=32, block_size=16, num_classes=5)).eval()
    idx, cond = torch.randint(0, 32, (2, 15)), torch.tensor([0, 3])
    out = model(idx, cond, return_hidden=(0, 1, 2))
    assert set(out.hidden) == {0, 1, 2} and out.hidden[2].shape == (2, 16, 128)
    # the final block output, normed and projected, gives the logits
    torch.testing.assert_close(model.output(model.norm(out.hidden[2])), out.logits)
    headless = model(idx, cond, return_hidden=(2,), logits=False)
    assert headless.logits is None
    torch.testing.assert_close(headless.hidden[2], out.hidden[2])
    with pytest.raises(ValueError, match="return_hidden"):
        model(idx, cond, return_hidden=(3,))


def test_headless_forward_stops_at_the_deepest_block_asked_for():
    model = GPT(GPTConfig.from_name("GPT-debug", vocab_size=32, block_size=16, num_classes=5)).eval()
    idx, cond = torch.randint(0, 32, (2, 15)), torch.tensor([0, 3])
    ran = []
    for i, block in enumerate(model.layers, start=1):
        block.register_forward_hook(lambda *_, i=i: ran.append(i))
    full = model(idx, cond, return_hidden=(1,))
    assert ran == [1, 2]
    ran.clear()
    headless = model(idx, cond, return_hidden=(1,), logits=False)
    assert ran == [1]  # block 2 is not needed for block 1's output
    torch.testing.assert_close(headless.hidden[1], full.hidden[1])
    ran.clear()
    maps = model(idx, cond, return_attention=(1,), logits=False).attention
    assert ran == [1] and maps[1].shape == (2, 4, 16, 16)


def test_attention_key_mask_hides_keys_from_other_queries():
    model = GPT(GPTConfig.from_name("GPT-debug", vocab_size=32, block_size=16, num_classes=5)).eval()
    torch.nn.init.normal_(model.output.weight, std=0.05)
    idx, cond = torch.randint(0, 32, (1, 15)), torch.tensor([2])
    hidden = torch.zeros(1, 16, dtype=torch.bool)
    hidden[0, 5] = True  # hide slot 5 (image token x_4 as input)
    mask = key_masked_causal_mask(hidden)
    masked = model(idx, cond, attn_mask=mask).logits
    plain = model(idx, cond).logits
    # queries before slot 5 never saw it; slot 5 still sees itself
    torch.testing.assert_close(masked[:, :6], plain[:, :6], atol=1e-6, rtol=0)
    assert (masked[:, 6:] - plain[:, 6:]).abs().max() > 1e-4
    # hiding a key equals replacing it, for later queries, by nothing: the all-False mask is causal
    no_hidden = key_masked_causal_mask(torch.zeros(1, 16, dtype=torch.bool))
    torch.testing.assert_close(model(idx, cond, attn_mask=no_hidden).logits, plain, atol=1e-6, rtol=0)


def test_bf16_model_keeps_fp32_rope_and_close_logits():
    model = GPT(GPTConfig.from_name("GPT-debug", vocab_size=32, block_size=16, num_classes=5)).eval()
    torch.nn.init.normal_(model.output.weight, std=0.05)
    idx, cond = torch.randint(0, 32, (2, 15)), torch.tensor([0, 3])
    ref = model(idx, cond).logits
    model = model.to(torch.bfloat16)
    assert model.freqs_cis.dtype == torch.float32
    torch.testing.assert_close(model.freqs_cis, rope_2d_table(32, 4))
    out = model(idx, cond).logits
    assert out.dtype == torch.float32
    assert (out - ref).abs().max() < 0.05 * ref.abs().max()


def test_init_follows_llamagen():
    model = GPT(GPTConfig.from_name("GPT-debug", vocab_size=32, block_size=16, num_classes=5))
    assert model.output.weight.abs().sum() == 0
    w = model.layers[0].attention.wqkv.weight
    assert abs(w.std().item() - 0.02) < 0.002
    assert all((m.weight == 1).all() for m in model.modules() if type(m).__name__ == "RMSNorm")


# LlamaGen's reported sizes (millions of parameters) for its presets.
LLAMAGEN_SIZES = {"GPT-B": 111, "GPT-L": 343, "GPT-XL": 775, "GPT-XXL": 1400, "GPT-XXXL": 3900, "GPT-3B": 3100}


@pytest.mark.parametrize("name", list(LLAMAGEN_SIZES))
def test_presets_have_llamagen_sizes(name):
    with torch.device("meta"):
        model = GPT(GPTConfig.from_name(name))
    n = sum(p.numel() for p in model.parameters()) / 1e6
    assert abs(n - LLAMAGEN_SIZES[name]) / LLAMAGEN_SIZES[name] < 0.01, n


def test_gpt_b_on_meta_has_llamagen_keys_and_shapes(gpt_golden):
    with torch.device("meta"):
        model = GPT(GPTConfig.from_name("GPT-B"))
    sd = model.state_dict()
    # the golden keys, with the layer loop widened from 2 to 12 layers
    golden_keys = list(gpt_golden["checkpoint"]["model"])
    per_layer = [k.split(".", 2)[2] for k in golden_keys if k.startswith("layers.0.")]
    expected = [k for k in golden_keys if not k.startswith("layers.")]
    expected += [f"layers.{i}.{rest}" for i in range(12) for rest in per_layer]
    assert sorted(sd) == sorted(expected)
    dim, hidden = 768, 2048  # hidden = round_up(int(2·4·768/3), 256)
    shapes = {
        "cls_embedding.embedding_table.weight": (1001, dim),
        "tok_embeddings.weight": (16384, dim),
        "layers.11.attention.wqkv.weight": (3 * dim, dim),
        "layers.11.attention.wo.weight": (dim, dim),
        "layers.11.feed_forward.w1.weight": (hidden, dim),
        "layers.11.feed_forward.w3.weight": (hidden, dim),
        "layers.11.feed_forward.w2.weight": (dim, hidden),
        "layers.11.attention_norm.weight": (dim,),
        "norm.weight": (dim,),
        "output.weight": (16384, dim),
    }
    for key, shape in shapes.items():
        assert tuple(sd[key].shape) == shape, key


def test_config_validation_messages():
    with pytest.raises(ValueError, match="unknown GPT preset 'GPT-Q'"):
        GPTConfig.from_name("GPT-Q")
    with pytest.raises(ValueError, match="not a square"):
        GPTConfig.from_name("GPT-B", block_size=200)
    with pytest.raises(ValueError, match="unknown model argument"):
        GPTConfig.from_model_args({"dimm": 3})
    with pytest.raises(ValueError, match="class-conditional"):
        GPTConfig.from_model_args({"model_type": "t2i"})
    assert GPTConfig.from_model_args({"max_batch_size": 32, "dim": 384}).dim == 384
    assert set(GPT_PRESETS) >= {"GPT-B", "GPT-L", "GPT-XL", "GPT-XXL", "GPT-XXXL", "GPT-3B"}


def test_sequence_too_long_is_refused():
    model = GPT(GPTConfig.from_name("GPT-debug", vocab_size=32, block_size=16, num_classes=5))
    with pytest.raises(ValueError, match="exceeds"):
        model(torch.zeros(1, 17, dtype=torch.long), torch.tensor([0]))


def test_drop_labels_rate_and_null_class():
    labels = torch.zeros(20000, dtype=torch.long)
    dropped = drop_labels(labels, 0.1, null_class=10, generator=torch.Generator().manual_seed(0))
    assert set(dropped.unique().tolist()) == {0, 10}
    assert abs((dropped == 10).float().mean().item() - 0.1) < 0.01
    assert drop_labels(labels, 0.0, 10) is labels


def test_grouped_kv_heads_match_repeated_full_heads():
    # a model with 2 k/v heads equals a full-head model whose k/v weights repeat each head
    small = GPT(GPTConfig.from_name("GPT-debug", vocab_size=32, block_size=16, num_classes=5, n_kv_head=2)).eval()
    torch.nn.init.normal_(small.output.weight, std=0.05)
    full = GPT(GPTConfig.from_name("GPT-debug", vocab_size=32, block_size=16, num_classes=5)).eval()
    sd = small.state_dict()
    hd = 32
    for i in range(2):
        wq, wk, wv = sd[f"layers.{i}.attention.wqkv.weight"].split([128, 64, 64])
        rep = lambda w: w.view(2, hd, 128).repeat_interleave(2, dim=0).reshape(128, 128)
        sd[f"layers.{i}.attention.wqkv.weight"] = torch.cat([wq, rep(wk), rep(wv)])
    full.load_state_dict(sd)
    idx, cond = torch.randint(0, 32, (2, 15)), torch.tensor([0, 3])
    torch.testing.assert_close(small(idx, cond).logits, full(idx, cond).logits, atol=1e-5, rtol=0)


def test_attention_maps_are_causal_distributions_and_do_not_change_the_output():
    model = GPT(GPTConfig.from_name("GPT-debug", vocab_size=32, block_size=16, num_classes=5)).eval()
    torch.nn.init.normal_(model.output.weight, std=0.05)
    idx, cond = torch.randint(0, 32, (2, 15)), torch.tensor([0, 3])
    plain = model(idx, cond)
    out = model(idx, cond, return_attention=(1, 2))
    torch.testing.assert_close(out.logits, plain.logits, atol=1e-5, rtol=0)
    assert plain.attention is None and set(out.attention) == {1, 2}
    for w in out.attention.values():
        assert w.shape == (2, 4, 16, 16)
        torch.testing.assert_close(w.sum(-1), torch.ones(2, 4, 16))  # rows sum to 1
        assert torch.triu(w, diagonal=1).abs().max() == 0  # no weight on future keys
    # with a key mask, hidden keys get no weight from other queries
    hidden = torch.zeros(2, 16, dtype=torch.bool)
    hidden[:, 3] = True
    masked = model(idx, cond, attn_mask=key_masked_causal_mask(hidden), return_attention=(2,)).attention[2]
    assert masked[:, :, 4:, 3].abs().max() == 0 and (masked[:, :, 3, 3] > 0).all()


@pytest.mark.parametrize("shape", [(8, 1, 48), (2, 3, 48), (16, 48), (17, 48), (2, 0, 48)])
@pytest.mark.parametrize("bias", [False, True])
def test_few_rows_linear_route_equals_f_linear_with_gradients(shape, bias, monkeypatch):
    # 1..16 rows take W @ xᵀ (the decode route), others F.linear: both must be the same layer
    torch.manual_seed(0)
    layer = Linear(48, 40, bias=bias)
    x = torch.randn(*shape, requires_grad=True)
    calls = []
    linear = F.linear
    monkeypatch.setattr(F, "linear", lambda *a: calls.append(1) or linear(*a))
    y = layer(x)
    monkeypatch.undo()
    rows = math.prod(shape[:-1])
    assert len(calls) == (0 if 0 < rows <= Linear.FEW_ROWS else 1)  # the route the row count calls for
    ref_x = x.detach().clone().requires_grad_(True)
    ref = F.linear(ref_x, layer.weight, layer.bias)
    assert y.shape == ref.shape == (*shape[:-1], 40)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=0)
    if y.numel():
        (y * torch.arange(y.numel()).reshape(y.shape)).sum().backward()
        grad_w = layer.weight.grad.clone()
        layer.weight.grad = None
        (ref * torch.arange(ref.numel()).reshape(ref.shape)).sum().backward()
        torch.testing.assert_close(x.grad, ref_x.grad, atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(grad_w, layer.weight.grad, atol=1e-4, rtol=1e-5)
