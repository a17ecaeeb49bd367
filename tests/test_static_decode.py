"""Static-shape decoding: the fixed-length cache with a tensor position, and generate(compile=True).

The compiled step must give the eager (and golden) generations token for token, and one graph
must serve every decode position. Inductor compiles once here (the golden greedy run); the
graph-counting tests use a backend that records each graph Dynamo hands it and runs it as is.
"""

import functools
import importlib

import pytest
import torch
import torch._dynamo.utils
from test_gpt import golden_model
from test_sampling import small_model

from st_ar.sampling import KVCache, generate
from st_ar.sampling.generate import generate_images, static_cache

gen = importlib.import_module("st_ar.sampling.generate")  # the module (the package exports a function of that name)


GRAPHS = []  # every graph Dynamo compiled for the static step in this file's tests


def recording_backend(gm, example_inputs):
    GRAPHS.append(gm)
    return gm.forward  # run the captured graph as is: eager numerics


@pytest.fixture
def counted(monkeypatch):
    """generate(compile=True) through the recording backend; counts the graphs a test adds.

    One backend for the whole file, so a shape compiled by an earlier test is reused (and the
    static step's Dynamo cache stays well under its recompile limit).
    """
    monkeypatch.setattr(
        gen, "compiled_decode_step", functools.partial(gen.compiled_decode_step, backend=recording_backend)
    )
    start = len(GRAPHS)
    return lambda: len(GRAPHS) - start


def test_static_cache_decode_matches_golden_and_prefix_decode(gpt_golden):
    model = golden_model(gpt_golden)
    idx, cond = gpt_golden["idx"], gpt_golden["cond_idx"]
    cache = KVCache.for_model(model, batch_size=3)
    steps = [model(idx[:, :0], cond, kv_cache=cache).logits]
    for t in range(idx.shape[1]):
        pos = torch.tensor(1 + t)
        steps.append(model(idx[:, t : t + 1], kv_cache=cache, start_pos=pos).logits)
    static = torch.cat(steps, dim=1)
    torch.testing.assert_close(static, gpt_golden["logits_kvcache"], atol=1e-5, rtol=0)
    torch.testing.assert_close(static, model(idx, cond).logits, atol=1e-5, rtol=0)


def test_static_cache_ignores_stale_slots():
    # the slots after the position are masked: whatever they hold does not reach the logits
    model = small_model()
    idx, cond = torch.randint(0, 32, (2, 8)), torch.tensor([1, 4])
    logits = []
    for fill in (0.0, 1e4):
        cache = KVCache.for_model(model, batch_size=2)
        for layer in cache.layers:
            layer.k.fill_(fill)
            layer.v.fill_(fill)
        model(idx[:, :0], cond, kv_cache=cache)
        out = [model(idx[:, t : t + 1], kv_cache=cache, start_pos=torch.tensor(1 + t)).logits for t in range(8)]
        logits.append(torch.cat(out, 1))
    torch.testing.assert_close(logits[0], logits[1], atol=0, rtol=0)
    torch.testing.assert_close(logits[0], model(idx, cond).logits[:, 1:], atol=1e-5, rtol=0)


def test_compiled_generation_matches_golden_with_one_inductor_graph(gpt_golden):
    # the real path: Inductor, fullgraph, dynamic=False
    model = golden_model(gpt_golden)
    kwargs = gpt_golden["generate_greedy_kwargs"]
    stats = torch._dynamo.utils.counters["stats"]
    before = stats["unique_graphs"]
    run = lambda: generate(
        model,
        gpt_golden["generate_cond"],
        num_tokens=kwargs["max_new_tokens"],
        top_k=kwargs["top_k"],
        return_logits=True,
        compile=True,
    )
    tokens, logits = run()
    assert stats["unique_graphs"] - before == 1  # one graph for all 15 decode positions
    assert torch.equal(tokens, gpt_golden["generate_greedy"].long())
    torch.testing.assert_close(logits, gpt_golden["generate_greedy_step_logits"], atol=1e-5, rtol=0)
    eager = generate(model, gpt_golden["generate_cond"], num_tokens=kwargs["max_new_tokens"], top_k=kwargs["top_k"])
    assert torch.equal(tokens, eager)
    again, _ = run()
    assert torch.equal(again, tokens) and stats["unique_graphs"] - before == 1  # no recompilation


def test_guided_generations_compile_to_one_graph(gpt_golden, counted):
    model = golden_model(gpt_golden)
    cond = gpt_golden["generate_cond"]
    kwargs = gpt_golden["generate_cfg_kwargs"]
    tokens, logits = generate(
        model, cond, cfg_scale=kwargs["cfg_scale"], top_k=kwargs["top_k"], return_logits=True, compile=True
    )
    assert torch.equal(tokens, gpt_golden["generate_cfg"].long())
    torch.testing.assert_close(logits, gpt_golden["generate_cfg_step_logits"], atol=1e-5, rtol=0)
    assert counted() == 1
    # guidance for the first tokens only keeps the unconditional rows (ignored): the same graph
    for interval in (0, 3):
        compiled = generate(model, cond, cfg_scale=2.5, cfg_interval=interval, top_k=1, compile=True)
        assert torch.equal(compiled, generate(model, cond, cfg_scale=2.5, cfg_interval=interval, top_k=1))
    # so does a shorter generation (the cache is always full length) and another model instance
    short = generate(model, cond, num_tokens=5, cfg_scale=2.5, top_k=1, compile=True)
    assert torch.equal(short, tokens[:, :5])
    other = golden_model(gpt_golden)
    assert torch.equal(generate(other, cond, cfg_scale=2.5, top_k=1, compile=True), tokens)
    assert counted() == 1  # (a new row count is one more graph: test_generate_images_passes_compile_through)


def test_compiled_sampling_draws_the_same_tokens_as_eager(counted):
    model = small_model()
    four, eight = torch.tensor([0, 1, 2, 3]), torch.tensor([0, 1, 2, 3, 4, 0, 1, 2])
    cases = [
        (four, dict(cfg_scale=2.0)),
        (four, dict(cfg_scale=2.0, cfg_interval=4, top_k=8, top_p=0.9)),
        (eight, dict(temperature=0.7)),  # 8 rows without guidance: the same shapes
    ]
    for cond, kwargs in cases:

        def draw(compile, cond=cond, kwargs=kwargs):
            return generate(model, cond, generator=torch.Generator().manual_seed(3), compile=compile, **kwargs)

        assert torch.equal(draw(True), draw(False)), kwargs
    assert counted() == 1


def test_generate_images_passes_compile_through(counted):
    model = small_model()
    labels = torch.tensor([0, 1, 2, 3, 4])
    codes, images = generate_images(model, None, labels, batch_size=4, cfg_scale=2.0, top_k=1, compile=True)
    assert images is None and torch.equal(codes, generate(model, labels, cfg_scale=2.0, top_k=1))
    # 8 rows (compiled already by the test above when run with it), then a new graph for 2 rows
    assert 1 <= counted() <= 2
    with pytest.raises(ValueError, match="top_k must be"):
        generate_images(model, None, labels, top_k=-1, compile=True)


def test_static_cache_is_kept_per_model_and_cleared():
    model = small_model()
    a = static_cache(model, 4)
    a.layers[0].k.fill_(1.0)
    b = static_cache(model, 4)
    assert b is a and b.layers[0].k.abs().sum() == 0 and b.max_len == 17
    assert static_cache(model, 2) is not a
    with pytest.raises(ValueError, match="not both"):
        generate(model, torch.tensor([0]), compile=True, decode_fn=lambda *a: None)
