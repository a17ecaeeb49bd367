"""Sampling: golden generations, guidance algebra, filters against naive references, seeding,
refused settings."""

import re

import pytest
import torch
from test_gpt import golden_model

from st_ar.models.gpt import GPT, GPTConfig
from st_ar.sampling import apply_cfg, filter_logits, generate, sample_logits
from st_ar.sampling.generate import generate_images, sample_categorical


def small_model(seed=0) -> GPT:
    torch.manual_seed(seed)
    model = GPT(GPTConfig.from_name("GPT-debug", vocab_size=32, block_size=16, num_classes=5)).eval()
    torch.nn.init.normal_(model.output.weight, std=0.2)
    return model


@pytest.mark.parametrize("kind", ["greedy", "cfg"])
def test_generations_match_golden(gpt_golden, kind):
    model = golden_model(gpt_golden)
    kwargs = gpt_golden[f"generate_{kind}_kwargs"]
    tokens, logits = generate(
        model,
        gpt_golden["generate_cond"],
        num_tokens=kwargs["max_new_tokens"],
        cfg_scale=kwargs["cfg_scale"],
        top_k=kwargs["top_k"],
        return_logits=True,
    )
    assert torch.equal(tokens, gpt_golden[f"generate_{kind}"].long())
    torch.testing.assert_close(logits, gpt_golden[f"generate_{kind}_step_logits"], atol=1e-5, rtol=0)


def test_cfg_scale_one_equals_conditional_model():
    model = small_model()
    cond = torch.tensor([0, 1, 4])
    tokens, logits = generate(model, cond, num_tokens=10, top_k=1, return_logits=True)
    # the same tokens fed to the plain forward give the same logits at every step
    full = model(tokens[:, :-1], cond).logits.transpose(0, 1)
    torch.testing.assert_close(logits, full, atol=1e-5, rtol=0)
    # and an explicit guided run at scale 1 mixes to the conditional logits
    torch.testing.assert_close(apply_cfg(full, full * 0.3 - 1, 1.0), full)


def test_cfg_combines_conditional_and_null_class_logits():
    model = small_model()
    cond = torch.tensor([2, 3])
    tokens, logits = generate(model, cond, num_tokens=6, cfg_scale=3.0, top_k=1, return_logits=True)
    c = model(tokens[:, :-1], cond).logits
    u = model(tokens[:, :-1], torch.full_like(cond, 5)).logits
    torch.testing.assert_close(logits.transpose(0, 1), u + 3.0 * (c - u), atol=1e-4, rtol=0)


def test_cfg_interval_guides_only_the_first_tokens():
    model = small_model()
    cond = torch.tensor([2, 3])
    tokens, logits = generate(model, cond, cfg_scale=3.0, cfg_interval=2, top_k=1, return_logits=True)
    c = model(tokens[:, :-1], cond).logits.transpose(0, 1)
    u = model(tokens[:, :-1], torch.full_like(cond, 5)).logits.transpose(0, 1)
    # LlamaGen convention: interval N guides tokens 0..N+1
    torch.testing.assert_close(logits[:4], (u + 3.0 * (c - u))[:4], atol=1e-4, rtol=0)
    torch.testing.assert_close(logits[4:], c[4:], atol=1e-5, rtol=0)


def naive_filter(row, top_k, top_p):
    """Reference: a Python loop over one row of logits."""
    values = row.tolist()
    keep = set(range(len(values)))
    if top_k > 0:
        kth = sorted(values, reverse=True)[min(top_k, len(values)) - 1]
        keep = {i for i in keep if values[i] >= kth}
    if top_p < 1.0:
        kept = sorted(keep, key=lambda i: -values[i])
        probs = torch.tensor([values[i] for i in kept]).softmax(0).tolist()
        mass, nucleus = 0.0, set()
        for i, p in zip(kept, probs):
            if mass > top_p:
                break
            nucleus.add(i)
            mass += p
        keep = nucleus
    return keep


@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (5, 1.0), (1, 1.0), (0, 0.5), (0, 0.9), (8, 0.7), (100, 0.95)])
def test_filters_match_naive_reference(top_k, top_p):
    gen = torch.Generator().manual_seed(top_k * 100 + int(top_p * 10))
    logits = torch.randn(6, 40, generator=gen) * 2
    out = filter_logits(logits, top_k, top_p)
    for row_in, row_out in zip(logits, out):
        kept = set(torch.nonzero(torch.isfinite(row_out)).flatten().tolist())
        assert kept == naive_filter(row_in, top_k, top_p)
        assert torch.equal(row_out[list(kept)], row_in[list(kept)])


def test_sampling_follows_the_distribution():
    assert sample_categorical(torch.tensor([[0.0, 0.0, 1.0, 0.0]])).item() == 2
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2, 0.0]]))
    draws = torch.stack([sample_logits(logits, generator=torch.Generator().manual_seed(s)) for s in range(2000)])
    freq = torch.bincount(draws.flatten(), minlength=4).float() / 2000
    assert torch.allclose(freq, torch.tensor([0.5, 0.3, 0.2, 0.0]), atol=0.04)
    # filtered tokens are never drawn, whatever the seed
    many = torch.randn(64, 100)
    kept = torch.isfinite(filter_logits(many, top_k=5, top_p=0.8))
    for seed in range(50):
        draws = sample_logits(many, top_k=5, top_p=0.8, generator=torch.Generator().manual_seed(seed))
        assert kept[torch.arange(64), draws].all()
    # temperature -> 0 and top-k 1 are greedy
    assert sample_logits(logits, temperature=0).item() == 0
    assert sample_logits(logits, top_k=1).item() == 0


def test_seeded_generation_is_reproducible_and_seed_dependent():
    model = small_model()
    cond = torch.tensor([0, 1, 2, 3])
    run = lambda seed: generate(model, cond, cfg_scale=2.0, generator=torch.Generator().manual_seed(seed))
    a, b, c = run(7), run(7), run(8)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert a.dtype == torch.long and a.shape == (4, 16) and a.min() >= 0 and a.max() < 32


def test_batch_rows_are_independent_of_batch_composition():
    model = small_model()
    alone = generate(model, torch.tensor([3]), cfg_scale=2.0, top_k=1)
    batched = generate(model, torch.tensor([1, 3, 0]), cfg_scale=2.0, top_k=1)
    assert torch.equal(alone[0], batched[1])


def test_bad_inputs_are_refused_clearly():
    model = small_model()
    with pytest.raises(ValueError, match=r"class labels must lie in \[0, 4\]"):
        generate(model, torch.tensor([0, 6]))
    with pytest.raises(ValueError, match="num_tokens"):
        generate(model, torch.tensor([0]), num_tokens=17)
    with pytest.raises(RuntimeError, match="eval mode"):
        generate(model.train(), torch.tensor([0]))


NAN, INF = float("nan"), float("inf")

# the allowed range each message states
ALLOWED = {
    "temperature": r"a finite number >= 0 \(0 = greedy\)",
    "top_p": r"a number in \(0, 1\] \(1 = no nucleus filter\)",
    "top_k": r"an integer >= 0 \(0 = no top-k filter, 1 = greedy\)",
    "cfg_scale": r"a finite number >= 0 \(1 = no guidance\)",
    "cfg_interval": r"an integer >= -1 \(-1 = guide every token\)",
}
BAD_SETTINGS = [
    *[("temperature", v) for v in (NAN, INF, -1.0, -1e-9)],
    *[("top_p", v) for v in (0.0, -0.5, 1.5, 1 + 1e-9, NAN)],
    *[("top_k", v) for v in (-3, 2.5, True)],
    *[("cfg_scale", v) for v in (NAN, -1.0, -INF, INF)],
    *[("cfg_interval", v) for v in (-2, 1.5)],
]


@pytest.mark.parametrize("setting,value", BAD_SETTINGS)
def test_bad_sampling_settings_are_refused_by_name(setting, value):
    model = small_model()
    message = rf"{setting} must be {ALLOWED[setting]}, got {re.escape(repr(value))}$"
    with pytest.raises(ValueError, match=message):
        generate(model, torch.tensor([0, 1]), **{setting: value})
    with pytest.raises(ValueError, match=message):
        generate_images(model, None, torch.tensor([0, 1]), **{setting: value})
    with pytest.raises(ValueError, match=message):
        generate_images(model, None, torch.tensor([], dtype=torch.long), **{setting: value})  # even with no work
    if setting in ("temperature", "top_k", "top_p"):
        with pytest.raises(ValueError, match=message):
            sample_logits(torch.randn(2, 32), **{setting: value})


def test_greedy_and_off_settings_still_mean_what_they_say():
    model = small_model()
    cond = torch.tensor([0, 3, 4])
    logits = torch.randn(8, 32)
    gen = lambda: torch.Generator().manual_seed(1)
    # temperature 0 and top-k 1 are arg-max, whatever the generator
    assert torch.equal(sample_logits(logits, temperature=0.0), logits.argmax(-1))
    assert torch.equal(sample_logits(logits, temperature=0), logits.argmax(-1))
    assert torch.equal(sample_logits(logits, temperature=5.0, top_k=1, generator=gen()), logits.argmax(-1))
    tokens, steps = generate(model, cond, temperature=0.0, return_logits=True)
    assert torch.equal(tokens, steps.argmax(-1).T)
    assert torch.equal(generate(model, cond, top_k=1, generator=gen()), tokens)
    # top_k 0 and top_p 1 are the filters off: the same draws as no filter arguments at all
    plain = generate(model, cond, generator=gen())
    assert torch.equal(generate(model, cond, top_k=0, top_p=1.0, generator=gen()), plain)
    assert torch.equal(generate(model, cond, top_p=1, generator=gen()), plain)
    # and the extremes of the allowed ranges are accepted: a tiny nucleus keeps the top token only
    assert torch.equal(generate(model, cond, top_p=1e-9, generator=gen()), tokens)


def test_guidance_below_one_mixes_towards_the_null_class():
    model = small_model()
    cond = torch.tensor([2, 3])
    for scale in (0.0, 0.5):  # 0 = the null class alone
        tokens, logits = generate(model, cond, num_tokens=5, cfg_scale=scale, top_k=1, return_logits=True)
        c = model(tokens[:, :-1], cond).logits
        u = model(tokens[:, :-1], torch.full_like(cond, 5)).logits
        torch.testing.assert_close(logits.transpose(0, 1), u + scale * (c - u), atol=1e-4, rtol=0)
