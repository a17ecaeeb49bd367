"""Weight-only int8: each layer multiplies by its rounded weights exactly, and a quantized GPT stays close to
fp32 (the agreement docs/performance.md reports is measured by benchmarks/sample_speed.py --int8). fp16 packed
weights: each layer multiplies by the fp16-rounded weights in fp32, and a packed GPT samples like fp32."""

import pytest
import torch
from torch import nn

from st_ar.models.gpt import GPT, GPTConfig
from st_ar.models.quantize import (
    FP16PackedLinear,
    Int8Linear,
    fp16_weight_kernel_available,
    pack_fp16_weights,
    quantize_int8_weights,
)
from st_ar.sampling.generate import generate


def test_int8_linear_is_the_matmul_with_its_rounded_weights():
    torch.manual_seed(0)
    linear = nn.Linear(64, 48, bias=False)
    q = Int8Linear(linear)
    w = linear.weight.detach()
    # round to nearest on a per-row scale: every weight within half a step of its original
    step = w.abs().amax(1, keepdim=True) / 127
    assert ((q.dequantized() - w).abs() <= step / 2 + 1e-7).all()
    assert q.weight_int8.abs().max() == 127 and q.weight_int8.dtype == torch.int8
    x = torch.randn(3, 5, 64)
    torch.testing.assert_close(q(x), x @ q.dequantized().T, rtol=1e-5, atol=1e-5)


def test_quantized_gpt_replaces_the_block_linears_and_stays_close_to_fp32():
    torch.manual_seed(0)
    config = GPTConfig.from_name("GPT-debug", vocab_size=64, block_size=16, num_classes=10)
    ref = GPT(config).eval()
    torch.nn.init.normal_(ref.output.weight, std=0.02)  # a zero head would make every logit equal
    model = GPT(config).eval()
    model.load_state_dict(ref.state_dict())
    quantize_int8_weights(model)
    kinds = {type(m) for m in model.layers.modules()}
    assert Int8Linear in kinds and nn.Linear not in kinds
    assert isinstance(model.output, nn.Linear)  # the head stays in the model's dtype
    tokens, labels = torch.randint(0, 64, (4, 15)), torch.arange(4)
    with torch.no_grad():
        a, b = ref(tokens, labels).logits, model(tokens, labels).logits
    assert (a - b).abs().max() < 0.05 * a.abs().max()
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.9
    out = generate(model, labels, num_tokens=16, cfg_scale=2.0, top_k=1)  # the cached decode path runs
    assert out.shape == (4, 16)


fp16_kernel = pytest.mark.skipif(not fp16_weight_kernel_available(), reason="no fbgemm fp16-weight linear")


@fp16_kernel
def test_fp16_packed_linear_multiplies_by_the_fp16_rounded_weights_in_fp32():
    torch.manual_seed(0)
    linear = nn.Linear(96, 40, bias=False)
    q = FP16PackedLinear(linear)
    w = linear.weight.detach()
    assert torch.equal(q.dequantized(), w.half().float())  # round to nearest fp16, nothing else
    x = torch.randn(2, 7, 96)
    torch.testing.assert_close(q(x), x @ w.half().float().T, rtol=1e-5, atol=1e-5)
    assert q.stored_bytes() == 2 * 96 * 40
    with pytest.raises(ValueError, match="fp32 activations"):
        q(x.bfloat16())
    big = nn.Linear(4, 4, bias=False)
    big.weight.data[0, 0] = 1e5
    with pytest.raises(ValueError, match="does not fit fp16"):
        FP16PackedLinear(big)


@fp16_kernel
def test_fp16_packed_gpt_packs_blocks_and_head_and_samples_like_fp32():
    torch.manual_seed(0)
    config = GPTConfig.from_name("GPT-debug", vocab_size=64, block_size=16, num_classes=10)
    ref = GPT(config).eval()
    torch.nn.init.normal_(ref.output.weight, std=0.02)
    model = GPT(config).eval()
    model.load_state_dict(ref.state_dict())
    pack_fp16_weights(model)
    assert isinstance(model.output, FP16PackedLinear)
    assert not any(isinstance(m, nn.Linear) for m in model.modules())
    tokens, labels = torch.randint(0, 64, (4, 15)), torch.arange(4)
    with torch.no_grad():
        a, b = ref(tokens, labels).logits, model(tokens, labels).logits
    assert (a - b).abs().max() < 2e-3 * a.abs().max()  # fp16 rounding of the weights, not of activations
    greedy = dict(num_tokens=16, cfg_scale=2.0, top_k=1)
    assert (generate(model, labels, **greedy) == generate(ref, labels, **greedy)).float().mean() > 0.9
    with pytest.raises(ValueError, match="compile=False"):
        generate(model, labels, compile=True, **greedy)
    with pytest.raises(ValueError, match="fp32 model on the CPU"):
        pack_fp16_weights(GPT(config).to(torch.bfloat16))
