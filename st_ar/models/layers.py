"""Building blocks of the LlamaGen GPT: RMSNorm, SwiGLU, 2D RoPE and mask/cache-aware attention.

Module and parameter names follow LlamaGen's so its checkpoints load without conversion.

Attention runs through one of two kernels for full sequences (``ATTENTION_BACKENDS``):

- ``"sdpa"``: ``F.scaled_dot_product_attention``, with ``is_causal`` when there is no mask (flash
  kernel on GPU) or the dense boolean mask the caller built (no flash kernel: arbitrary masks
  need the efficient or the math kernel, which compute the whole S x S score matrix);
- ``"flex"``: FlexAttention (torch >= 2.5) with a ``BlockMask``, which skips the blocks above
  the diagonal and evaluates the mask only in the blocks it cuts. A dense mask is turned into
  a ``BlockMask`` once per forward (``block_mask_from_dense``).

``"auto"`` picks flex for masked forwards on CUDA when FlexAttention exists, SDPA otherwise.
On CPU it stays SDPA: this torch has no FlexAttention backward on CPU, and the compiled CPU
forward measured slower than the dense-mask SDPA at 256 tokens (docs/performance.md).
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

try:  # FlexAttention arrived in torch 2.5
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
except ImportError:  # pragma: no cover - older torch
    BlockMask = create_block_mask = flex_attention = None

ATTENTION_BACKENDS = ("auto", "sdpa", "flex")


def flex_available() -> bool:
    return flex_attention is not None


def is_block_mask(mask) -> bool:
    return BlockMask is not None and isinstance(mask, BlockMask)


def resolve_attention_backend(backend: str, device: torch.device, masked: bool) -> str:
    """``"auto"`` -> ``"flex"`` for masked forwards on CUDA with FlexAttention, else ``"sdpa"``."""
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"attention backend must be one of {', '.join(ATTENTION_BACKENDS)}, got {backend!r}")
    if backend == "flex" and not flex_available():
        raise RuntimeError(f"attention='flex' needs FlexAttention (torch >= 2.5); this is torch {torch.__version__}")
    if backend == "auto":
        return "flex" if masked and device.type == "cuda" and flex_available() else "sdpa"
    return backend


def block_mask_from_dense(mask: Tensor | None, batch: int, seq_len: int, device: torch.device):
    """A FlexAttention ``BlockMask`` allowing what the bool ``mask`` allows (True = may attend).

    ``mask`` broadcasts to (B, H, S, S) as SDPA's would; None is plain causal attention. The
    mask_mod reads the dense tensor, so the kernel needs no knowledge of how it was built; a
    caller who knows the structure can build a cheaper mask_mod (objectives.masks).
    """
    if mask is None:

        def causal(b, h, q, kv):
            return q >= kv

        return create_block_mask(causal, None, None, seq_len, seq_len, device=device)
    mask = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape)).to(device)
    heads = mask.shape[1]
    if heads == 1:  # one mask for every head: the mask_mod must not index heads (h runs over all of them)
        shared = mask[:, 0].expand(batch, seq_len, seq_len)

        def allowed(b, h, q, kv):
            return shared[b, q, kv]

        return create_block_mask(allowed, batch, None, seq_len, seq_len, device=device)
    per_head = mask.expand(batch, heads, seq_len, seq_len)

    def allowed_per_head(b, h, q, kv):
        return per_head[b, h, q, kv]

    return create_block_mask(allowed_per_head, batch, heads, seq_len, seq_len, device=device)


@functools.cache
def _compiled_flex_attention():
    # FlexAttention is only fused under torch.compile; eager calls run an unfused reference that
    # materialises the scores. Compiled once per process (per shape, dynamic=False).
    return torch.compile(flex_attention, dynamic=False)


def run_flex_attention(q: Tensor, k: Tensor, v: Tensor, block_mask) -> Tensor:
    """(B, H, S, hd) x3 -> (B, H, S, hd); inside a compiled region the call is traced as is."""
    compiling = getattr(torch.compiler, "is_compiling", lambda: False)()
    kernel = flex_attention if compiling else _compiled_flex_attention()
    return kernel(q, k, v, block_mask=block_mask)


class RMSNorm(nn.Module):
    """x / rms(x) * weight, normalised in fp32 whatever the activation dtype (as LlamaGen)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return normed.type_as(x) * self.weight


class Linear(nn.Linear):
    """``nn.Linear`` (the same parameters and state-dict keys) with a faster CPU route for a few rows.

    A decode step multiplies every weight by a handful of rows. On CPU, in fp32, MKL streams a weight
    from memory faster as ``W @ xᵀ`` (then transposed back) than as ``x @ Wᵀ``: 1.4-1.5x the whole GPT-B
    decode step at 8 rows (docs/performance.md). More rows, other dtypes and devices, and compiled
    graphs (Inductor picks its own kernels) take ``F.linear``.
    """

    FEW_ROWS = 16

    def forward(self, x: Tensor) -> Tensor:
        rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
        if (
            not 0 < rows <= self.FEW_ROWS
            or x.device.type != "cpu"
            or x.dtype != torch.float32
            or torch.compiler.is_compiling()
        ):
            return F.linear(x, self.weight, self.bias)
        y = (self.weight @ x.reshape(rows, -1).t()).t().reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x); w1 is the gate, w3 the up projection, w2 the down one."""

    def __init__(self, dim: int, hidden: int, dropout: float = 0.0):
        super().__init__()
        self.w1 = Linear(dim, hidden, bias=False)
        self.w3 = Linear(dim, hidden, bias=False)
        self.w2 = Linear(hidden, dim, bias=False)
        self.ffn_dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.ffn_dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)))


def rope_2d_table(head_dim: int, grid: int, cls_token_num: int = 1, base: float = 10000.0) -> Tensor:
    """The (cls_token_num + grid², head_dim/2, 2) table of (cos, sin) used by LlamaGen.

    The first half of the rotated pairs encodes the token's row, the second half its column,
    each with frequencies base^(-4j/head_dim). Class-token rows are all zero, cos included: this
    zeroes the class token's q and k in every layer. It is not an identity rotation, but it is
    what LlamaGen checkpoints were trained with, so we keep it.
    """
    if head_dim % 4:
        raise ValueError(f"2D RoPE needs head_dim divisible by 4, got {head_dim}")
    half = head_dim // 2
    freqs = 1.0 / (base ** (torch.arange(0, half, 2)[: half // 2].float() / half))  # (head_dim/4,)
    pos = torch.arange(grid, dtype=torch.float32)
    row_angles = torch.outer(pos, freqs)  # (grid, head_dim/4)
    col_angles = torch.outer(pos, freqs)
    angles = torch.cat(
        [row_angles[:, None, :].expand(-1, grid, -1), col_angles[None, :, :].expand(grid, -1, -1)], dim=-1
    ).reshape(grid * grid, half)  # raster order: position p = r·grid + c
    table = torch.stack([torch.cos(angles), torch.sin(angles)], dim=-1)  # (grid², half, 2)
    return torch.cat([torch.zeros(cls_token_num, half, 2), table])


def apply_rope(x: Tensor, table: Tensor) -> Tensor:
    """Rotate adjacent channel pairs (x[2i], x[2i+1]) of x (B, S, H, D) by table (S, D/2, 2).

    (x0, x1) -> (x0·cos − x1·sin, x1·cos + x0·sin), in fp32 whatever the activation dtype. The
    same product as LlamaGen's complex multiply, written in real arithmetic so that Inductor
    can fuse it (it has no code generation for complex tensors).
    """
    pairs = x.float().reshape(*x.shape[:-1], -1, 2)  # (B, S, H, D/2, 2)
    x0, x1 = pairs.unbind(-1)
    cos, sin = table[None, :, None, :, 0], table[None, :, None, :, 1]  # (1, S, 1, D/2)
    return torch.stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], dim=-1).flatten(-2).type_as(x)


class Attention(nn.Module):
    """Causal multi-head attention with a fused [q | k | v] projection (grouped k/v heads allowed).

    Ways to run it:
      - full sequence, no mask: causal SDPA (flash/efficient kernels on GPU);
      - full sequence with ``attn_mask`` (bool, True = may attend, broadcastable to
        (B, H, S, S)): the caller's mask replaces causality, so it must include it;
      - full sequence with a FlexAttention ``BlockMask`` as ``attn_mask``: flex_attention;
      - with a KV cache and an int ``start_pos``: keys/values of this chunk are written at
        ``start_pos`` and the chunk attends over the whole cached prefix;
      - with a KV cache and a tensor ``start_pos`` (static decoding): the cache hands back its
        whole fixed-length buffer and ``attn_mask`` (S, max_len), built by the caller, hides
        the slots after each query's position.
    """

    def __init__(self, dim: int, n_head: int, n_kv_head: int, attn_dropout: float, resid_dropout: float):
        super().__init__()
        self.n_head, self.n_kv_head = n_head, n_kv_head
        self.head_dim = dim // n_head
        self.wqkv = Linear(dim, (n_head + 2 * n_kv_head) * self.head_dim, bias=False)
        self.wo = Linear(n_head * self.head_dim, dim, bias=False)
        self.attn_dropout_p = attn_dropout
        self.resid_dropout = nn.Dropout(resid_dropout)

    def forward(
        self,
        x: Tensor,  # (B, S, dim)
        rope: Tensor,  # (S, head_dim/2, 2)
        attn_mask=None,  # bool Tensor, a BlockMask, or None (causal)
        kv_cache=None,  # a per-layer view of sampling.kv_cache.KVCache
        start_pos: int | Tensor = 0,
        need_weights: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """(B, S, dim) -> (B, S, dim); with ``need_weights`` also the (B, H, S, keys) attention
        probabilities, computed explicitly (for analysis: slower than the fused kernel)."""
        B, S, _ = x.shape
        q_size, kv_size = self.n_head * self.head_dim, self.n_kv_head * self.head_dim
        q, k, v = self.wqkv(x).split([q_size, kv_size, kv_size], dim=-1)
        q = apply_rope(q.view(B, S, self.n_head, self.head_dim), rope)
        k = apply_rope(k.view(B, S, self.n_kv_head, self.head_dim), rope)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # (B, H, S, hd)
        v = v.view(B, S, self.n_kv_head, self.head_dim).transpose(1, 2)

        is_causal = attn_mask is None
        if kv_cache is not None:
            k, v = kv_cache.update(start_pos, k, v)  # (B, H_kv, start_pos + S or max_len, hd)
            if isinstance(start_pos, Tensor):
                if attn_mask is None:
                    raise ValueError("static decoding (tensor start_pos) needs the position mask as attn_mask")
                is_causal = False
            elif S == 1:
                is_causal = False  # one new query may see every cached key
            elif attn_mask is None and start_pos > 0:
                # a chunk after a prefix: query i sits at start_pos + i
                q_pos = torch.arange(start_pos, start_pos + S, device=x.device)
                attn_mask = torch.arange(k.shape[2], device=x.device)[None, :] <= q_pos[:, None]
                is_causal = False
        if self.n_kv_head != self.n_head:
            k = k.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
            v = v.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
        if is_block_mask(attn_mask):
            if need_weights:
                raise ValueError("attention maps need the dense path (attention='sdpa')")
            if self.training and self.attn_dropout_p > 0:
                raise ValueError("FlexAttention has no attention dropout; use attention='sdpa' with attn_dropout_p > 0")
            out = run_flex_attention(q, k, v, attn_mask)  # (B, H, S, hd)
            return self.resid_dropout(self.wo(out.transpose(1, 2).reshape(B, S, q_size)))
        if need_weights:
            scores = (q @ k.transpose(-1, -2)).float() * self.head_dim**-0.5  # (B, H, S, keys)
            if attn_mask is None:
                attn_mask = torch.ones(S, k.shape[2], dtype=torch.bool, device=x.device).tril(k.shape[2] - S)
            weights = scores.masked_fill(~attn_mask, float("-inf")).softmax(-1)
            out = (weights.type_as(v) @ v).transpose(1, 2).reshape(B, S, q_size)
            return self.resid_dropout(self.wo(out)), weights
        if kv_cache is not None and S == 1:
            # One query over the cached keys: two small matmuls beat the fused kernel's set-up
            # cost on CPU (about 1.5x at 8 sequences x 200 keys), and the result is the same.
            weights = (q @ k.transpose(-1, -2)).float() * self.head_dim**-0.5  # (B, H, 1, T)
            if attn_mask is not None:  # static cache: slots after the position are empty
                weights = weights.masked_fill(~attn_mask, float("-inf"))
            out = weights.softmax(-1).type_as(v) @ v
            return self.resid_dropout(self.wo(out.transpose(1, 2).reshape(B, S, q_size)))
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=attn_mask,
            is_causal=is_causal and S > 1,
            dropout_p=self.attn_dropout_p if self.training else 0.0,
        )  # (B, H, S, hd)
        out = out.transpose(1, 2).reshape(B, S, q_size)
        return self.resid_dropout(self.wo(out))


def drop_path(x: Tensor, rate: float, training: bool) -> Tensor:
    """Stochastic depth: drop the whole residual branch of a sample with probability ``rate``."""
    if rate == 0.0 or not training:
        return x
    keep = 1.0 - rate
    mask = x.new_empty(x.shape[0], *([1] * (x.dim() - 1))).bernoulli_(keep)
    return x * mask / keep


class TransformerBlock(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then h + ffn(norm(h))."""

    def __init__(self, config, drop_path_rate: float = 0.0):
        super().__init__()
        self.attention = Attention(
            config.dim, config.n_head, config.kv_heads, config.attn_dropout_p, config.resid_dropout_p
        )
        self.feed_forward = FeedForward(config.dim, config.ffn_hidden, config.ffn_dropout_p)
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)
        self.drop_path_rate = drop_path_rate

    def forward(
        self,
        x: Tensor,
        rope: Tensor,
        attn_mask=None,
        kv_cache=None,
        start_pos: int | Tensor = 0,
        need_weights: bool = False,
    ):
        a = self.attention(self.attention_norm(x), rope, attn_mask, kv_cache, start_pos, need_weights)
        a, weights = a if need_weights else (a, None)
        h = x + drop_path(a, self.drop_path_rate, self.training)
        out = h + drop_path(self.feed_forward(self.ffn_norm(h)), self.drop_path_rate, self.training)
        return (out, weights) if need_weights else out


def round_up(n: int, multiple: int) -> int:
    return multiple * math.ceil(n / multiple)
