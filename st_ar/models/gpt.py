"""LlamaGen-compatible class-conditional GPT over VQ image tokens.

One forward serves training, analysis and KV-cache decoding:

    out = model(tokens, cond, attn_mask=None, kv_cache=None, start_pos=0, return_hidden=(6, 12))
    out.logits  # (B, S, vocab) fp32, position p predicts image token start_pos + p
    out.hidden  # {6: (B, S, dim), 12: (B, S, dim)}: outputs of blocks 6 and 12 (0 = embeddings)

The sequence is [class token, x_0, ..., x_{T-2}] in training (``cond`` given, ``start_pos`` 0),
and a chunk of image tokens at ``start_pos`` when decoding with a cache (``cond`` None).
``start_pos`` may be a 0-d integer tensor: static decoding over the cache's whole fixed-length
buffer with the slots after the position masked, one set of shapes for every position (what a
compiled or CUDA-graphed decode step needs; sampling.generate(compile=True)).

``attention`` ("auto", "sdpa" or "flex", per call or as ``model.attention_backend``) picks the
kernel for full-sequence forwards; see models/layers.py. ``attn_mask`` may be a dense bool
tensor or a FlexAttention ``BlockMask`` (which implies flex).
Label dropout for classifier-free guidance is not done inside the forward (unlike LlamaGen):
the training step calls ``drop_labels`` so that several views of one image share one decision.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.utils.checkpoint
from torch import Tensor, nn

from .layers import (
    ATTENTION_BACKENDS,
    Linear,
    RMSNorm,
    TransformerBlock,
    block_mask_from_dense,
    is_block_mask,
    resolve_attention_backend,
    rope_2d_table,
    round_up,
)
from .loading import (
    CheckpointError,
    atomic_save,
    checkpoint_args,
    checkpoint_family,
    extract_state_dict,
    load_strict,
    read_checkpoint,
)

CHECKPOINT_KIND = "st-ar-gpt"


@dataclass
class GPTConfig:
    """Architecture of the class-conditional GPT; field names are LlamaGen's ModelArgs names."""

    dim: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_kv_head: int | None = None  # None: as many k/v heads as query heads
    multiple_of: int = 256  # SwiGLU hidden size is rounded up to a multiple of this
    ffn_dim_multiplier: float | None = None
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    initializer_range: float = 0.02
    # regularisation (LlamaGen's training defaults)
    token_dropout_p: float = 0.1
    attn_dropout_p: float = 0.0
    resid_dropout_p: float = 0.1
    ffn_dropout_p: float = 0.1
    drop_path_rate: float = 0.0
    class_dropout_prob: float = 0.1  # applied by the training step through drop_labels
    # data
    num_classes: int = 1000  # the class table has num_classes + 1 rows; the last is the null class
    vocab_size: int = 16384
    cls_token_num: int = 1
    block_size: int = 256  # image tokens per sample = grid²: 256 at 256 px, 576 at 384 px (VQ-16)

    def __post_init__(self):
        for name in ("dim", "n_layer", "n_head", "num_classes", "vocab_size", "block_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"GPTConfig.{name} must be positive, got {getattr(self, name)}")
        if self.dim % self.n_head:
            raise ValueError(f"GPTConfig: dim {self.dim} is not divisible by n_head {self.n_head}")
        if self.head_dim % 4:
            raise ValueError(f"GPTConfig: head_dim {self.head_dim} must be divisible by 4 for 2D RoPE")
        if self.n_head % self.kv_heads:
            raise ValueError(f"GPTConfig: n_head {self.n_head} is not a multiple of n_kv_head {self.n_kv_head}")
        if self.cls_token_num != 1:
            raise ValueError("GPTConfig: class-conditional models use exactly one class token (cls_token_num=1)")
        if math.isqrt(self.block_size) ** 2 != self.block_size:
            raise ValueError(f"GPTConfig: block_size {self.block_size} is not a square token grid")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_head

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def grid_size(self) -> int:
        return math.isqrt(self.block_size)

    @property
    def null_class(self) -> int:
        return self.num_classes

    @property
    def ffn_hidden(self) -> int:
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return round_up(hidden, self.multiple_of)

    @classmethod
    def from_name(cls, name: str, **overrides) -> GPTConfig:
        if name not in GPT_PRESETS:
            raise ValueError(f"unknown GPT preset {name!r}; known presets: {', '.join(GPT_PRESETS)}")
        return cls(**{**GPT_PRESETS[name], **overrides})

    @classmethod
    def from_model_args(cls, args: Mapping[str, Any], base: GPTConfig | None = None) -> GPTConfig:
        """Build from LlamaGen ModelArgs field names (e.g. ``--model-args '{"dim": 512}'``).

        Runtime-only LlamaGen fields (cache sizes, text-conditioning) are accepted and ignored.
        """
        fields = {f.name for f in dataclasses.fields(cls)}
        args = dict(args)
        if args.pop("model_type", "c2i") != "c2i":
            raise ValueError("only class-conditional (model_type 'c2i') models are supported")
        for ignored in LLAMAGEN_RUNTIME_FIELDS:
            args.pop(ignored, None)
        unknown = sorted(set(args) - fields)
        if unknown:
            hints = [
                f"{u!r} (did you mean {close[0]!r}?)" if (close := difflib.get_close_matches(u, fields, 1)) else repr(u)
                for u in unknown
            ]
            raise ValueError(f"unknown model argument(s) {', '.join(hints)}; valid names: {', '.join(sorted(fields))}")
        return dataclasses.replace(base or cls(), **args)


# LlamaGen ModelArgs fields that describe a run, not the weights.
LLAMAGEN_RUNTIME_FIELDS = ("max_batch_size", "max_seq_len", "caption_dim")

# (n_layer, n_head, dim) of LlamaGen's sizes, plus small ones for tests and the CPU demo.
GPT_PRESETS: dict[str, dict[str, int]] = {
    "GPT-debug": dict(n_layer=2, n_head=4, dim=128),  # unit tests
    "GPT-T": dict(n_layer=4, n_head=4, dim=128),  # the CPU demo and the small-scale ablation
    "GPT-S": dict(n_layer=8, n_head=8, dim=256),  # small CPU runs
    "GPT-B": dict(n_layer=12, n_head=12, dim=768),  # 111M
    "GPT-L": dict(n_layer=24, n_head=16, dim=1024),  # 343M
    "GPT-XL": dict(n_layer=36, n_head=20, dim=1280),  # 775M
    "GPT-XXL": dict(n_layer=48, n_head=24, dim=1536),  # 1.4B
    "GPT-XXXL": dict(n_layer=48, n_head=40, dim=2560),  # 3.9B
    "GPT-3B": dict(n_layer=24, n_head=32, dim=3200),  # 3.1B, head_dim 100
}


class ModelOutput(NamedTuple):
    logits: Tensor | None  # (B, S, vocab) fp32; None when the head was skipped
    hidden: dict[int, Tensor]  # block index -> (B, S, dim); 0 is the embedding output
    attention: dict[int, Tensor] | None = None  # block index -> (B, H, S, keys) probabilities


class ClassEmbedding(nn.Module):
    """Class table with one extra row, the null class used for classifier-free guidance."""

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.num_classes = num_classes
        self.embedding_table = nn.Embedding(num_classes + 1, dim)

    def forward(self, labels: Tensor) -> Tensor:
        return self.embedding_table(labels)


def drop_labels(labels: Tensor, prob: float, null_class: int, generator: torch.Generator | None = None) -> Tensor:
    """Replace each label by the null class with probability ``prob`` (CFG training)."""
    if prob <= 0:
        return labels
    drop = torch.rand(labels.shape, device=labels.device, generator=generator) < prob
    return torch.where(drop, torch.full_like(labels, null_class), labels)


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.cls_embedding = ClassEmbedding(config.num_classes, config.dim)
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.tok_dropout = nn.Dropout(config.token_dropout_p)
        # stochastic depth grows linearly with depth, 0 at the first block (LlamaGen)
        rates = [config.drop_path_rate * i / max(config.n_layer - 1, 1) for i in range(config.n_layer)]
        self.layers = nn.ModuleList(TransformerBlock(config, rate) for rate in rates)
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = Linear(config.dim, config.vocab_size, bias=False)
        # Not in the state dict (LlamaGen files have none); kept fp32 by _apply below.
        self.register_buffer("freqs_cis", self._rope_table(), persistent=False)
        # recompute each block in the backward pass instead of storing its activations
        self.activation_checkpointing = False
        # kernel for full-sequence attention: "auto" (flex for masked forwards on CUDA), "sdpa", "flex"
        self.attention_backend = "auto"
        if not self.freqs_cis.is_meta:
            self.init_weights()

    def _rope_table(self, device=None) -> Tensor:
        c = self.config
        return rope_2d_table(c.head_dim, c.grid_size, c.cls_token_num, c.rope_base).to(device)

    def _apply(self, fn, recurse=True):
        # .to(bfloat16) would round the RoPE angles; rebuild the table in fp32 on the new device.
        super()._apply(fn, recurse)
        self.freqs_cis = self._rope_table(self.freqs_cis.device)
        return self

    @torch.no_grad()
    def init_weights(self) -> None:
        """normal(0, initializer_range) for linears and embeddings; zero output head (LlamaGen)."""
        std = self.config.initializer_range
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, 0.0, std)
            elif isinstance(m, RMSNorm):
                nn.init.ones_(m.weight)
        nn.init.zeros_(self.output.weight)

    def forward(
        self,
        tokens: Tensor,  # (B, L) image token indices
        cond: Tensor | None = None,  # (B,) class labels; prepended as the class token when given
        *,
        attn_mask=None,  # bool Tensor (True = may attend, broadcastable to (B, H, S, S)) or a BlockMask
        kv_cache=None,  # sampling.kv_cache.KVCache
        start_pos: int | Tensor = 0,  # sequence position of the first slot; a 0-d tensor = static decoding
        return_hidden: Iterable[int] = (),
        return_attention: Iterable[int] = (),  # blocks (1-based) whose attention maps to return
        logits: bool = True,  # False skips the head, the final norm and the blocks past the deepest one asked for
        attention: str | None = None,  # "auto" | "sdpa" | "flex"; None = self.attention_backend
    ) -> ModelOutput:
        x = self.tok_embeddings(tokens)  # (B, L, dim)
        static = isinstance(start_pos, Tensor)
        if cond is not None:
            if static or start_pos != 0:
                raise ValueError("the class token sits at position 0; pass cond only with start_pos=0")
            x = torch.cat([self.cls_embedding(cond)[:, None], x], dim=1)  # (B, S = 1 + L, dim)
        B, S = x.shape[:2]
        if static:
            if kv_cache is None:
                raise ValueError("a tensor start_pos (static decoding) needs a kv_cache")
            # positions are data here: no host-side bounds check (it would sync and break a graph)
            positions = start_pos + torch.arange(S, device=x.device)  # (S,)
            rope = self.freqs_cis[positions]  # (S, head_dim/2, 2)
            slots = torch.arange(kv_cache.max_len, device=x.device)
            attn_mask = slots[None, :] <= positions[:, None]  # (S, max_len): filled slots up to each query
        else:
            if start_pos + S > self.freqs_cis.shape[0]:
                raise ValueError(
                    f"sequence of {start_pos + S} positions exceeds the model's {self.freqs_cis.shape[0]} "
                    f"(1 class token + block_size {self.config.block_size})"
                )
            rope = self.freqs_cis[start_pos : start_pos + S]
        h = self.tok_dropout(x)

        want = set(return_hidden)
        if any(not 0 <= i <= self.config.n_layer for i in want):
            raise ValueError(f"return_hidden indices must lie in [0, {self.config.n_layer}], got {sorted(want)}")
        hidden = {0: h} if 0 in want else {}
        maps = set(return_attention)
        if any(not 1 <= i <= self.config.n_layer for i in maps):
            raise ValueError(f"return_attention indices must lie in [1, {self.config.n_layer}], got {sorted(maps)}")
        attn_mask = self._attention_mask(attn_mask, attention, B, S, x.device, kv_cache is not None or bool(maps))
        attention_maps = {}
        # without logits or a cache to fill, the blocks past the deepest one asked for are not needed
        depth = self.config.n_layer if logits or kv_cache is not None else max(want | maps, default=0)
        for i, layer in enumerate(self.layers[:depth], start=1):
            layer_cache = kv_cache.layers[i - 1] if kv_cache is not None else None
            if i in maps:
                h, attention_maps[i] = layer(h, rope, attn_mask, layer_cache, start_pos, need_weights=True)
            elif self.activation_checkpointing and self.training and torch.is_grad_enabled():
                h = torch.utils.checkpoint.checkpoint(layer, h, rope, attn_mask, None, 0, use_reentrant=False)
            else:
                h = layer(h, rope, attn_mask, layer_cache, start_pos)
            if i in want:
                hidden[i] = h
        out = self.output(self.norm(h)).float() if logits else None  # (B, S, vocab)
        return ModelOutput(out, hidden, attention_maps if maps else None)

    def _attention_mask(self, attn_mask, attention: str | None, B: int, S: int, device, dense_only: bool):
        """The mask in the form the chosen kernel takes: a BlockMask for flex, else as given.

        Cached decoding and attention maps always take the dense path (a BlockMask given
        there is refused); the BlockMask is built once per forward and shared by every layer.
        """
        backend = attention or self.attention_backend
        if backend not in ATTENTION_BACKENDS:
            raise ValueError(f"attention must be one of {', '.join(ATTENTION_BACKENDS)}, got {backend!r}")
        if dense_only:
            if is_block_mask(attn_mask):
                raise ValueError("a BlockMask serves full-sequence forwards only (no kv_cache, no attention maps)")
            return attn_mask
        if is_block_mask(attn_mask):
            resolve_attention_backend("flex", device, True)  # refuses cleanly without FlexAttention
            return attn_mask
        if backend == "auto" and self.training and self.config.attn_dropout_p > 0:
            return attn_mask  # FlexAttention has no attention dropout
        if resolve_attention_backend(backend, device, attn_mask is not None) == "flex":
            return block_mask_from_dense(attn_mask, B, S, device)
        return attn_mask

    # ---------------------------------------------------------------- checkpoints

    def save(self, path: str | os.PathLike, **extra: Any) -> None:
        """Write {"model", "config", "kind", **extra} atomically: a crash never leaves half a file."""
        save_gpt(path, self.config, self.state_dict(), **extra)

    @classmethod
    def from_checkpoint(
        cls,
        path: str | os.PathLike,
        name: str | None = None,
        *,
        model_args: Mapping[str, Any] | None = None,
        trust: bool = False,
        trust_hint: str = "--trust-checkpoint",
        map_location: str | torch.device = "cpu",
    ) -> GPT:
        """Load our checkpoints (config inside) or LlamaGen's (``name`` and/or ``model_args`` needed).

        For a LlamaGen file the architecture is ``GPTConfig.from_name(name)`` updated with
        ``model_args`` (LlamaGen field names, e.g. block_size=576 for 384-px checkpoints).
        """
        obj = read_checkpoint(path, trust=trust, trust_hint=trust_hint)
        source = os.fspath(path)
        if checkpoint_family(obj) == "VQ tokenizer":
            raise CheckpointError(
                f"{source} is a VQ tokenizer checkpoint, not a GPT: pass it as the tokenizer "
                "(VQModel.from_checkpoint; command line: --vq-ckpt)"
            )
        stored = obj.get("config") if isinstance(obj, Mapping) and obj.get("kind") == CHECKPOINT_KIND else None
        if name is None and model_args is None:
            if stored is None:
                raise CheckpointError(
                    f"{source} has no stored configuration (a LlamaGen checkpoint?): pass the preset "
                    f"name (one of {', '.join(GPT_PRESETS)}) and, if it differs, --model-args"
                )
            config = GPTConfig(**stored)
        else:
            base = GPTConfig.from_name(name) if name is not None else GPTConfig(**stored) if stored else None
            if base is None:
                raise CheckpointError(f"{source}: model_args alone need a preset name to start from")
            config = GPTConfig.from_model_args(model_args or {}, base)
            if stored is not None:
                _check_stored_config(stored, config, source)
        with torch.device("meta"):
            model = cls(config)
        model = model.to_empty(device=map_location)
        _check_llamagen_facts(obj, config, source)
        load_strict(model, extract_state_dict(obj, source=source), source=source, explain=explain_gpt_mismatch(config))
        return model


def save_gpt(path: str | os.PathLike, config: GPTConfig, state_dict: Mapping[str, Tensor], **extra: Any) -> None:
    """Our GPT checkpoint format; ``GPT.from_checkpoint(path)`` reads it with no other argument."""
    payload = {"model": dict(state_dict), "config": dataclasses.asdict(config), "kind": CHECKPOINT_KIND}
    atomic_save({**payload, **extra}, path)


def _check_stored_config(stored: Mapping[str, Any], asked: GPTConfig, source: str) -> None:
    diffs = [
        f"{k}: file {stored[k]} vs asked {getattr(asked, k)}"
        for k in ("dim", "n_layer", "n_head", "n_kv_head", "vocab_size", "num_classes", "block_size")
        if k in stored and stored[k] != getattr(asked, k)
    ]
    if diffs:
        raise CheckpointError(f"{source} was trained with another architecture:\n  - " + "\n  - ".join(diffs))


def explain_gpt_mismatch(config: GPTConfig):
    """Turn the shapes in a state dict into the architecture facts that differ from ``config``."""

    def explain(sd: Mapping[str, Tensor]) -> list[str]:
        facts = []

        def differ(what: str, in_file: Any, in_model: Any) -> None:
            if in_file != in_model:
                facts.append(f"{what}: file {in_file} vs model {in_model}")

        if "tok_embeddings.weight" in sd:
            vocab, dim = sd["tok_embeddings.weight"].shape
            differ("vocabulary size", vocab, config.vocab_size)
            differ("width (dim)", dim, config.dim)
        if "cls_embedding.embedding_table.weight" in sd:
            differ("number of classes", sd["cls_embedding.embedding_table.weight"].shape[0] - 1, config.num_classes)
        layer_ids = {int(k.split(".")[1]) for k in sd if k.startswith("layers.")}
        if layer_ids:
            differ("number of layers", max(layer_ids) + 1, config.n_layer)
        if "layers.0.feed_forward.w1.weight" in sd:
            differ("FFN hidden size", sd["layers.0.feed_forward.w1.weight"].shape[0], config.ffn_hidden)
        if "layers.0.attention.wqkv.weight" in sd:
            rows = sd["layers.0.attention.wqkv.weight"].shape[0]
            differ("q/k/v projection rows", rows, (config.n_head + 2 * config.kv_heads) * config.head_dim)
        return facts

    return explain


def _check_llamagen_facts(obj: Any, config: GPTConfig, source: str) -> None:
    """Use what a LlamaGen file tells beyond weight shapes: its training args and cached tables.

    Weight shapes cannot tell the token grid (256 vs 384 px) or the head count; the "args"
    Namespace, a stored RoPE table or a KV cache can.
    """
    facts = []
    args = checkpoint_args(obj)
    if args.get("image_size") and args.get("downsample_size"):
        grid = args["image_size"] // args["downsample_size"]
        if grid * grid != config.block_size:
            facts.append(
                f"token grid: file trained at {args['image_size']} px / {args['downsample_size']} = {grid}x{grid} "
                f"({grid * grid} tokens) vs model block_size {config.block_size}"
            )
    if args.get("gpt_model") in GPT_PRESETS:
        preset = GPT_PRESETS[args["gpt_model"]]
        if any(preset[k] != getattr(config, k) for k in preset):
            facts.append(
                f"architecture: file is {args['gpt_model']} {preset}, model has "
                f"n_layer={config.n_layer}, n_head={config.n_head}, dim={config.dim}"
            )
    for key in ("vocab_size", "num_classes", "cls_token_num"):
        if isinstance(args.get(key), int) and args[key] != getattr(config, key):
            facts.append(f"{key}: file {args[key]} vs model {getattr(config, key)}")
    raw = obj.get("model", obj) if isinstance(obj, Mapping) else {}
    if isinstance(raw, Mapping):
        for k, t in raw.items():
            if k.endswith("freqs_cis") and torch.is_tensor(t) and t.dim() >= 1:
                if t.shape[0] != config.block_size + config.cls_token_num:
                    facts.append(
                        f"token grid: file's RoPE table has {t.shape[0]} rows, model needs "
                        f"{config.block_size + config.cls_token_num} (1 class + {config.block_size} image tokens)"
                    )
                break
        for k, t in raw.items():
            if k.endswith("kv_cache.k_cache") and torch.is_tensor(t) and t.dim() == 4:
                if t.shape[1] != config.kv_heads:
                    facts.append(f"attention heads: file's KV cache has {t.shape[1]}, model {config.kv_heads}")
                break
    if facts:
        raise CheckpointError(f"{source} does not fit the model:\n  - " + "\n  - ".join(facts))
