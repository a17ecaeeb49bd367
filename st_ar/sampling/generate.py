"""Class-conditional sampling with a KV cache and classifier-free guidance.

Small free functions so the hot loop (``decode_one_token``) can be compiled on its own:

    prefill          class token -> logits for image token 0, cache filled at position 0
    decode_one_token one image token at position p -> logits for the next one
    generate         the loop: guidance, filtering, sampling, cache bookkeeping

Guidance runs the conditional and the null-class halves as one batch and mixes fp32 logits,
``uncond + s·(cond − uncond)`` (LlamaGen); the sampled token is fed to both halves.

``generate(..., compile=True)`` decodes with static shapes: a fixed-length cache (class token +
block_size slots, whatever num_tokens is), the position passed as a 0-d tensor, the empty slots
masked. One compiled graph (``torch.compile(fullgraph=True, dynamic=False)``; CUDA graphs through
mode "reduce-overhead" on CUDA) then serves every position of every generation with the same
number of rows; a new row count or model shape compiles one more graph. Per model the cache is
kept and reused, so its buffers keep their addresses from one call to the next (what a recorded
CUDA graph needs). The prefill (one call per generation) runs eagerly. Once cfg_interval ends
guidance, the compiled path keeps the unconditional rows running and ignores them (as LlamaGen's
own decode loop does): one graph for the whole generation instead of a second one for half the
rows; the eager path drops them instead.
"""

from __future__ import annotations

import math
import numbers
import weakref
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from ..images import to_uint8
from ..models.quantize import FP16PackedLinear
from ..progress import progress_bar
from .kv_cache import KVCache


def apply_cfg(cond_logits: Tensor, uncond_logits: Tensor, scale: float) -> Tensor:
    return uncond_logits + scale * (cond_logits - uncond_logits)


def filter_logits(logits: Tensor, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """Set to -inf every logit outside the top-k and outside the smallest set of mass >= top_p.

    top_k 0 and top_p 1.0 disable the filters. The most likely token always survives. Ties at
    the k-th value are all kept (as LlamaGen, which compares against the k-th largest value).
    """
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # drop a token once the mass of the tokens ranked above it exceeds top_p
        drop_sorted = torch.zeros_like(cum, dtype=torch.bool)
        drop_sorted[..., 1:] = cum[..., :-1] > top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def check_sampling_settings(
    *,
    cfg_scale: float = 1.0,
    cfg_interval: int = -1,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
) -> None:
    """Refuse settings that would not sample what they say: NaN gives all-zero codes, and an
    out-of-range temperature or filter would quietly turn into greedy decoding or no filter."""

    def refuse(name: str, value, allowed: str) -> None:
        raise ValueError(f"{name} must be {allowed}, got {value!r}")

    def real(value) -> bool:
        return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)

    def integer(value) -> bool:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)

    if not real(temperature) or temperature < 0:
        refuse("temperature", temperature, "a finite number >= 0 (0 = greedy)")
    if not integer(top_k) or top_k < 0:
        refuse("top_k", top_k, "an integer >= 0 (0 = no top-k filter, 1 = greedy)")
    if not real(top_p) or not 0 < top_p <= 1:
        refuse("top_p", top_p, "a number in (0, 1] (1 = no nucleus filter)")
    # scales in [0, 1) mix towards the unconditional model: unusual but well defined
    if not real(cfg_scale) or cfg_scale < 0:
        refuse("cfg_scale", cfg_scale, "a finite number >= 0 (1 = no guidance)")
    if not integer(cfg_interval) or cfg_interval < -1:
        refuse("cfg_interval", cfg_interval, "an integer >= -1 (-1 = guide every token)")


def sample_logits(
    logits: Tensor,  # (B, V) fp32
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Temperature, top-k, top-p, then one multinomial draw per row; temperature 0 is greedy."""
    check_sampling_settings(temperature=temperature, top_k=top_k, top_p=top_p)
    if temperature == 0 or top_k == 1:
        return logits.argmax(-1)
    probs = filter_logits(logits / temperature, top_k, top_p).softmax(-1)
    return sample_categorical(probs, generator)


def sample_categorical(probs: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """One draw per row of ``probs`` (B, V) by inverting the CDF with a single uniform per row.

    Same distribution as torch.multinomial, which on CPU draws an exponential variate for every
    entry (V = 16384 per row): one uniform per row is several times cheaper per decode step.
    """
    cdf = probs.cumsum(-1)
    u = torch.rand(probs.shape[0], 1, device=probs.device, generator=generator, dtype=cdf.dtype) * cdf[:, -1:]
    # first index whose cdf exceeds u: zero-probability entries never qualify
    idx = torch.searchsorted(cdf, u, right=True).squeeze(-1)
    # u can round up to the total; then take the last token with mass (first maximum of the cdf)
    return torch.where(idx < probs.shape[-1], idx, cdf.argmax(-1))


def prefill(model, cond: Tensor, cache: KVCache) -> Tensor:
    """Run the class token through the model, filling the cache; logits for image token 0."""
    empty = cond.new_empty(cond.shape[0], 0)
    return model(empty, cond, kv_cache=cache).logits[:, -1]  # (B, V)


def decode_one_token(model, token: Tensor, pos: int | Tensor, cache: KVCache) -> Tensor:
    """Feed image token ``token`` (B,) at sequence position ``pos``; logits (B, V) for the next.

    ``pos`` a 0-d integer tensor on the model's device decodes with static shapes (see the
    module docstring); an int attends over the filled prefix only.
    """
    return model(token[:, None], kv_cache=cache, start_pos=pos).logits[:, -1]


def _static_decode_step(model, token: Tensor, pos: Tensor, cache: KVCache) -> Tensor:
    # its own function (not decode_one_token) so that its compiled graphs are cached apart from
    # any compile a caller applies to decode_one_token
    return model(token[:, None], kv_cache=cache, start_pos=pos).logits[:, -1]


_compiled_steps: dict[tuple, Callable] = {}
_static_caches: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def compiled_decode_step(device: torch.device | str, backend: str | Callable = "inductor"):
    """The compiled static decode step for models on ``device``'s kind of device.

    One ``torch.compile`` wrapper per (device type, backend): graphs are cached by Dynamo and
    keyed by its guards (model shapes, row count, dtype), so every call with the same shapes
    reuses the graph, whichever model instance of that architecture it gets. CUDA: mode
    "reduce-overhead" (CUDA graphs). CPU: the default mode. ``backend`` other than Inductor is
    for tests (e.g. a graph-counting backend).
    """
    kind = torch.device(device).type
    key = (kind, backend)
    if key not in _compiled_steps:
        mode = "reduce-overhead" if kind == "cuda" and backend == "inductor" else None
        _compiled_steps[key] = torch.compile(
            _static_decode_step, fullgraph=True, dynamic=False, backend=backend, mode=mode
        )
    return _compiled_steps[key]


def static_cache(model, batch_size: int) -> KVCache:
    """A full-length (class token + block_size) cache for ``model``, kept per model and reused
    (zeroed) while the row count, dtype and device stay the same, so its addresses stay fixed."""
    c = model.config
    p = model.tok_embeddings.weight  # the model's dtype and device (the head may be packed)
    max_len = c.cls_token_num + c.block_size
    cache = _static_caches.get(model)
    if cache is not None and cache.matches(batch_size, max_len, p.dtype, p.device):
        return cache.zero_()
    cache = KVCache.for_model(model, batch_size, max_len).mark_static()
    _static_caches[model] = cache
    return cache


@torch.no_grad()
def generate(
    model,
    cond: Tensor,  # (B,) class labels
    *,
    num_tokens: int | None = None,  # default: the full image (block_size)
    cfg_scale: float = 1.0,
    cfg_interval: int = -1,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    decode_fn=decode_one_token,
    return_logits: bool = False,
    compile: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Sample image tokens (B, num_tokens) int64 for the classes in ``cond``.

    cfg_interval follows LlamaGen's convention: -1 guides every token; N >= 0 guides tokens
    0 .. N+1 (its decode loop counts from the token after the prefill) and then samples from the
    conditional half alone, which we then stop computing (eager) or compute and ignore
    (compiled). ``return_logits`` also returns the (guided, unfiltered) logits each token was
    drawn from, (num_tokens, B, V). ``compile`` decodes with the compiled static step (module
    docstring): the first call per shape compiles, later ones reuse the graph.
    """
    check_sampling_settings(
        cfg_scale=cfg_scale, cfg_interval=cfg_interval, temperature=temperature, top_k=top_k, top_p=top_p
    )
    config = model.config
    num_tokens = num_tokens or config.block_size
    if not 0 < num_tokens <= config.block_size:
        raise ValueError(f"num_tokens must lie in [1, {config.block_size}], got {num_tokens}")
    if cond.dim() != 1:
        raise ValueError(f"cond must be a 1-D tensor of class labels, got shape {tuple(cond.shape)}")
    if cond.numel() and (int(cond.min()) < 0 or int(cond.max()) > config.num_classes):
        raise ValueError(
            f"class labels must lie in [0, {config.num_classes - 1}] ({config.num_classes} = null class), "
            f"got min {int(cond.min())}, max {int(cond.max())}"
        )
    if model.training:
        raise RuntimeError("generate() needs the model in eval mode (dropout would change samples); call .eval()")
    if compile and decode_fn is not decode_one_token:
        raise ValueError("pass either compile=True or a decode_fn, not both")
    if compile and any(isinstance(m, FP16PackedLinear) for m in model.modules()):
        raise ValueError("fp16 packed weights (pack_fp16_weights) decode eagerly: pass compile=False")
    B = cond.shape[0]
    guided = cfg_scale != 1.0
    if guided:
        cond = torch.cat([cond, torch.full_like(cond, config.null_class)])
    rows = cond.shape[0]
    if compile:
        cache = static_cache(model, rows)
        step = compiled_decode_step(model.tok_embeddings.weight.device)
        cuda = model.tok_embeddings.weight.device.type == "cuda"
        mark_step = getattr(torch.compiler, "cudagraph_mark_step_begin", None) if cuda else None

        def decode(model, feed: Tensor, pos: int, cache: KVCache) -> Tensor:
            if mark_step is not None:
                mark_step()  # a new decode step: the previous step's graph outputs may be overwritten
            position = torch.full((), pos, dtype=torch.long, device=feed.device)
            # a CUDA graph's output buffer is reused by its next replay: keep a copy
            return step(model, feed, position, cache).clone()

    else:
        cache = KVCache.for_model(model, rows, config.cls_token_num + num_tokens)
        decode = decode_fn

    def pick(logits: Tensor) -> tuple[Tensor, Tensor]:
        # guided: mix the halves; otherwise the conditional rows (all of them, unless the
        # compiled path still carries the ignored unconditional half)
        logits = apply_cfg(logits[:B], logits[B:], cfg_scale) if guided else logits[:B]
        return sample_logits(logits, temperature, top_k, top_p, generator), logits

    tokens = torch.empty(B, num_tokens, dtype=torch.long, device=cond.device)
    all_logits = [] if return_logits else None
    logits = prefill(model, cond, cache)
    for t in range(num_tokens):
        if guided and cfg_interval >= 0 and t > cfg_interval + 1:
            guided = False  # guidance is over: sample from the conditional half alone
            if not compile:  # and stop computing the other half (compiled: keep the shapes)
                rows = B
                cache.keep_rows(slice(0, B))
                logits = logits[:B]
        token, used = pick(logits)
        tokens[:, t] = token
        if all_logits is not None:
            all_logits.append(used)
        if t + 1 < num_tokens:
            feed = torch.cat([token, token]) if rows != B else token
            logits = decode(model, feed, config.cls_token_num + t, cache)
    if return_logits:
        return tokens, torch.stack(all_logits)
    return tokens


@torch.no_grad()
def generate_images(
    model,
    vq,
    labels: Tensor,  # (N,) class labels
    *,
    batch_size: int = 64,
    generator: torch.Generator | None = None,
    progress: str | None = None,
    compile: bool = False,
    **sampling,
) -> tuple[Tensor, np.ndarray | None]:
    """Sample ``labels`` in batches and decode them: ((N, T) int64 codes on the CPU, (N, H, W, 3) uint8).

    ``vq`` None skips decoding (images None). ``sampling``: generate()'s cfg_scale, cfg_interval,
    temperature, top_k, top_p. ``progress``: a bar with this title, or None for no bar.
    ``compile``: generate()'s compiled static decode step (a last, smaller batch compiles one
    more graph for its row count).
    """
    check_sampling_settings(**sampling)
    grid = (model.config.grid_size, model.config.grid_size)
    codes, images = [], []
    with progress_bar(total=len(labels), unit="img", desc=progress or "", disable=progress is None) as bar:
        for i in range(0, len(labels), batch_size):
            batch = generate(model, labels[i : i + batch_size], generator=generator, compile=compile, **sampling)
            codes.append(batch.cpu())
            if vq is not None:
                images.append(to_uint8(vq.decode(batch, grid=grid)))
            bar.update(batch.shape[0])
    return torch.cat(codes), (np.concatenate(images) if vq is not None else None)
