"""LlamaGen-compatible VQ image tokenizer (VQ-16 / VQ-8): images <-> grids of codebook indices.

The module names, parameter shapes and numerics follow LlamaGen's tokenizer, so its released
checkpoints load strictly and give the same codes. The network is the VQGAN encoder/decoder:

    images (B, 3, H, W) in [-1, 1]
      -> Encoder -> (B, z_channels, H/f, W/f) -> quant_conv -> (B, D, h, w)
      -> VectorQuantizer (cosine nearest neighbour in a K x D codebook) -> codes (B, h, w)
      -> codebook rows -> post_quant_conv -> Decoder -> images (B, 3, H, W)

with f = 2 ** (levels - 1) (16 for VQ-16) and D = codebook_embed_dim (8).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from st_ar.models.loading import (
    CheckpointError,
    atomic_save,
    checkpoint_family,
    extract_state_dict,
    load_strict,
    read_checkpoint,
)

CHECKPOINT_KIND = "st-ar-vq"
# LlamaGen keeps the last 65536 code indices whatever the codebook size; the buffer is in every checkpoint.
CODEBOOK_USED_LEN = 65536
NORM_GROUPS = 32
NORM_EPS = 1e-6
# Rows of latent vectors per distance matrix in the nearest-code search: bounds memory to
# chunk x codebook_size floats (256 MB for VQ-16) when tokenizing large batches.
DISTANCE_CHUNK = 4096

VQ_PRESETS: dict[str, dict[str, Any]] = {
    "VQ-16": dict(
        ch=128,
        encoder_ch_mult=(1, 1, 2, 2, 4),
        decoder_ch_mult=(1, 1, 2, 2, 4),
        z_channels=256,
        codebook_size=16384,
        codebook_embed_dim=8,
    ),
    "VQ-8": dict(
        ch=128,
        encoder_ch_mult=(1, 2, 2, 4),
        decoder_ch_mult=(1, 2, 2, 4),
        z_channels=256,
        codebook_size=16384,
        codebook_embed_dim=8,
    ),
    # tiny, for tests: downsample 2, widths 32 / 64
    "VQ-debug": dict(
        ch=32,
        encoder_ch_mult=(1, 2),
        decoder_ch_mult=(1, 2),
        z_channels=32,
        codebook_size=64,
        codebook_embed_dim=8,
    ),
    # CPU demo (MNIST / Fashion-MNIST at 32 px): downsample 4 -> 8x8 = 64 tokens; see docs/tokenizer.md
    "VQ-mnist": dict(
        ch=32,
        encoder_ch_mult=(1, 2, 2),
        decoder_ch_mult=(1, 2, 2),
        z_channels=64,
        num_res_blocks=1,
        codebook_size=512,
        codebook_embed_dim=8,
    ),
}


# --------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------


@dataclass
class VQConfig:
    """Architecture of the tokenizer. Field names are LlamaGen's tokenizer ``ModelArgs`` names."""

    codebook_size: int = 16384
    codebook_embed_dim: int = 8
    codebook_l2_norm: bool = True
    codebook_show_usage: bool = True
    commit_loss_beta: float = 0.25
    entropy_loss_ratio: float = 0.0
    encoder_ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    decoder_ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    z_channels: int = 256
    dropout_p: float = 0.0
    ch: int = 128  # not a ModelArgs field: LlamaGen always uses the Encoder/Decoder default of 128
    num_res_blocks: int = 2  # encoder; the decoder uses num_res_blocks + 1
    in_channels: int = 3

    def __post_init__(self) -> None:
        for name in (
            "codebook_size",
            "codebook_embed_dim",
            "z_channels",
            "ch",
            "num_res_blocks",
            "in_channels",
        ):
            setattr(self, name, _positive_int(getattr(self, name), name))
        for name in ("encoder_ch_mult", "decoder_ch_mult"):
            mult = getattr(self, name)
            if isinstance(mult, (str, bytes)) or not hasattr(mult, "__iter__"):
                raise ValueError(f"VQConfig.{name} must be a sequence of positive ints, got {mult!r}")
            mult = tuple(_positive_int(m, f"{name}[{i}]") for i, m in enumerate(mult))
            if not mult:
                raise ValueError(f"VQConfig.{name} must have at least one level")
            setattr(self, name, mult)
        if len(self.encoder_ch_mult) != len(self.decoder_ch_mult):
            # the decoder must upsample by exactly the factor the encoder downsampled by
            raise ValueError(
                f"VQConfig.decoder_ch_mult has {len(self.decoder_ch_mult)} levels but encoder_ch_mult has "
                f"{len(self.encoder_ch_mult)}; they must match"
            )
        if not 0.0 <= self.dropout_p < 1.0:
            raise ValueError(f"VQConfig.dropout_p must be in [0, 1), got {self.dropout_p!r}")
        for name in ("commit_loss_beta", "entropy_loss_ratio"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"VQConfig.{name} must be >= 0, got {getattr(self, name)!r}")
        # every GroupNorm(32) sees a width ch * mult (mults are ints), so checking ch covers them all
        if self.ch % NORM_GROUPS:
            raise ValueError(
                f"VQConfig.ch = {self.ch} must be divisible by {NORM_GROUPS}: every width (ch * mult) "
                f"feeds a GroupNorm with {NORM_GROUPS} groups"
            )

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.encoder_ch_mult) - 1)

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> VQConfig:
        """A preset from ``VQ_PRESETS`` ("VQ-16", "VQ-8", "VQ-debug"), fields replaced by ``overrides``."""
        key = _preset_key(name)
        if key is None:
            raise ValueError(f"unknown VQ preset {name!r}; known: {', '.join(VQ_PRESETS)}")
        return cls.from_dict({**VQ_PRESETS[key], **overrides}, source=f"preset {key} with overrides")

    @classmethod
    def from_dict(cls, fields: Mapping[str, Any], *, source: str = "config") -> VQConfig:
        """Build from a field dict (e.g. ``dataclasses.asdict`` output); unknown fields are an error."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(fields) - known)
        if unknown:
            raise ValueError(f"{source}: unknown VQConfig field(s) {unknown}; known: {sorted(known)}")
        return cls(**fields)


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise ValueError(f"VQConfig.{name} must be a positive int, got {value!r}")
    return int(value)


def _preset_key(name: str) -> str | None:
    # "VQ-16", "vq-16" and "VQ_16" all name the same preset
    wanted = str(name).upper().replace("_", "-")
    return next((key for key in VQ_PRESETS if key.upper() == wanted), None)


# --------------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------------


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(NORM_GROUPS, channels, eps=NORM_EPS, affine=True)


class ResnetBlock(nn.Module):
    """norm -> swish -> conv3x3, twice, plus a skip (1x1 ``nin_shortcut`` when the width changes)."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = _norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        # Identity has no parameters, so same-width blocks have no shortcut keys (as in LlamaGen)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:  # (B, in, H, W) -> (B, out, H, W)
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions, 1x1 convs for q/k/v/out, residual."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = _norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:  # (B, C, H, W) -> (B, C, H, W)
        b, c, h, w = x.shape
        x_norm = self.norm(x)
        # (B, C, H, W) -> (B, 1 head, H*W tokens, C)
        q, k, v = (conv(x_norm).flatten(2).transpose(1, 2).unsqueeze(1) for conv in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)  # softmax over keys of q.k / sqrt(C)
        out = out.squeeze(1).transpose(1, 2).reshape(b, c, h, w)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Halve H and W: zero-pad right/bottom by 1, then a 3x3 stride-2 conv with no padding."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:  # (B, C, H, W) -> (B, C, H/2, W/2)
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Double H and W: nearest-neighbour x2, then a 3x3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:  # (B, C, H, W) -> (B, C, 2H, 2W)
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution: ResnetBlocks (``res.j``), each followed by an AttnBlock (``attn.j``) if any.

    The parent Encoder/Decoder attaches ``downsample`` / ``upsample`` to every level but the last,
    so the keys read ``conv_blocks.{level}.res.{j}``, ``.attn.{j}``, ``.downsample.conv``.
    """

    def __init__(self, in_channels: int, out_channels: int, num_blocks: int, attn: bool, dropout: float) -> None:
        super().__init__()
        self.res = nn.ModuleList(
            ResnetBlock(in_channels if j == 0 else out_channels, out_channels, dropout) for j in range(num_blocks)
        )
        self.attn = nn.ModuleList(AttnBlock(out_channels) for _ in range(num_blocks if attn else 0))

    def forward(self, x: Tensor) -> Tensor:  # (B, in, H, W) -> (B, out, H, W)
        for j, block in enumerate(self.res):
            x = block(x)
            if len(self.attn):
                x = self.attn[j](x)
        return x


def _mid(channels: int, dropout: float) -> nn.Sequential:
    # keys mid.0 / mid.1 / mid.2
    return nn.Sequential(
        ResnetBlock(channels, channels, dropout),
        AttnBlock(channels),
        ResnetBlock(channels, channels, dropout),
    )


class Encoder(nn.Module):
    """images (B, in_channels, H, W) -> latent (B, z_channels, H/f, W/f). Attention only at the last level."""

    def __init__(self, config: VQConfig) -> None:
        super().__init__()
        widths = [config.ch * m for m in config.encoder_ch_mult]
        last = len(widths) - 1
        self.conv_in = nn.Conv2d(config.in_channels, config.ch, 3, padding=1)
        self.conv_blocks = nn.ModuleList()
        prev = config.ch
        for i, width in enumerate(widths):
            level = Level(prev, width, config.num_res_blocks, attn=i == last, dropout=config.dropout_p)
            if i != last:
                level.downsample = Downsample(width)
            self.conv_blocks.append(level)
            prev = width
        self.mid = _mid(prev, config.dropout_p)
        self.norm_out = _norm(prev)
        self.conv_out = nn.Conv2d(prev, config.z_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for i, level in enumerate(self.conv_blocks):
            h = level(h)
            if i != len(self.conv_blocks) - 1:
                h = level.downsample(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """latent (B, z_channels, h, w) -> images (B, 3, h*f, w*f).

    ``conv_blocks.0`` is the deepest level (widest, with attention); widths follow
    ``reversed(decoder_ch_mult)``. Each level has num_res_blocks + 1 ResnetBlocks.
    """

    def __init__(self, config: VQConfig) -> None:
        super().__init__()
        widths = [config.ch * m for m in reversed(config.decoder_ch_mult)]  # deepest first
        last = len(widths) - 1
        self.conv_in = nn.Conv2d(config.z_channels, widths[0], 3, padding=1)
        self.mid = _mid(widths[0], config.dropout_p)
        self.conv_blocks = nn.ModuleList()
        prev = widths[0]
        for i, width in enumerate(widths):
            level = Level(prev, width, config.num_res_blocks + 1, attn=i == 0, dropout=config.dropout_p)
            if i != last:
                level.upsample = Upsample(width)
            self.conv_blocks.append(level)
            prev = width
        self.norm_out = _norm(prev)
        self.conv_out = nn.Conv2d(prev, 3, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid(self.conv_in(z))
        for i, level in enumerate(self.conv_blocks):
            h = level(h)
            if i != len(self.conv_blocks) - 1:
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


# --------------------------------------------------------------------------------------------------
# Quantizer
# --------------------------------------------------------------------------------------------------


class QuantizerOutput(NamedTuple):
    z_q: Tensor  # (B, D, h, w) quantized latent; straight-through: its gradient flows to the encoder
    codes: Tensor  # (B, h, w) int64 codebook indices
    codebook_loss: Tensor  # scalar, mean |z_q - sg(z)|^2: moves the codebook towards the latents
    commit_loss: Tensor  # scalar, beta * mean |sg(z_q) - z|^2: keeps the encoder near its codes
    entropy_loss: Tensor  # scalar, entropy_loss_ratio * entropy_loss_from_affinity; 0 if the ratio is 0


class VectorQuantizer(nn.Module):
    """Nearest-neighbour quantization against a K x D codebook (``embedding``).

    With ``codebook_l2_norm`` the latent vectors and the codebook rows are l2-normalised before the
    search, so the nearest code is the one with the highest cosine similarity, and the quantized
    latent is a normalised codebook row. Distances, losses and the straight-through estimate are
    computed in float32 even under autocast: near-ties in bf16 would change codes.
    """

    def __init__(self, config: VQConfig) -> None:
        super().__init__()
        self.codebook_size = config.codebook_size
        self.embed_dim = config.codebook_embed_dim
        self.l2_norm = config.codebook_l2_norm
        self.beta = config.commit_loss_beta
        self.entropy_loss_ratio = config.entropy_loss_ratio
        self.show_usage = config.codebook_show_usage
        self.embedding = nn.Embedding(self.codebook_size, self.embed_dim)
        with torch.no_grad():  # LlamaGen's init: small uniform rows, normalised when codes are
            self.embedding.weight.uniform_(-1.0 / self.codebook_size, 1.0 / self.codebook_size)
            if self.l2_norm:
                self.embedding.weight.copy_(F.normalize(self.embedding.weight, dim=-1))
        if self.show_usage:
            # rolling record of the most recent code indices (float, as in LlamaGen); training mode only
            self.register_buffer("codebook_used", torch.zeros(CODEBOOK_USED_LEN))

    def codebook(self) -> Tensor:
        """(K, D) rows the codes index: normalised if codebook_l2_norm (storage is not)."""
        weight = self.embedding.weight
        return F.normalize(weight, dim=-1) if self.l2_norm else weight

    def _flatten(self, z: Tensor) -> Tensor:
        # (B, D, h, w) -> (B*h*w, D) float32 in (b, h, w) row-major order, normalised if l2_norm
        flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]).float()
        return F.normalize(flat, dim=-1) if self.l2_norm else flat

    @staticmethod
    def _distances(flat: Tensor, codebook: Tensor) -> Tensor:
        # (N, D), (K, D) -> (N, K) squared distances |z|^2 + |e|^2 - 2 z.e
        return flat.pow(2).sum(1, keepdim=True) + codebook.pow(2).sum(1) - 2 * flat @ codebook.t()

    def _nearest(self, flat: Tensor, codebook: Tensor) -> Tensor:
        # (N, D) -> (N,) int64; argmin returns the first minimum, so ties go to the lowest index
        return torch.cat([self._distances(part, codebook).argmin(1) for part in flat.split(DISTANCE_CHUNK)])

    @torch.no_grad()
    def codes(self, z: Tensor) -> Tensor:
        """(B, D, h, w) pre-quant latent -> (B, h, w) int64 codes. No losses, no usage record."""
        b, _, h, w = z.shape
        with torch.autocast(z.device.type, enabled=False):
            return self._nearest(self._flatten(z), self.codebook().float()).view(b, h, w)

    def lookup(self, codes: Tensor) -> Tensor:
        """(B, h, w) integer codes -> (B, D, h, w) codebook rows (normalised if l2_norm)."""
        return self.codebook()[codes.long()].permute(0, 3, 1, 2)

    def forward(self, z: Tensor) -> QuantizerOutput:
        b, d, h, w = z.shape
        with torch.autocast(z.device.type, enabled=False):
            flat = self._flatten(z)  # (N, D)
            codebook = self.codebook().float()  # (K, D)
            codes = self._nearest(flat.detach(), codebook.detach())  # (N,)
            z_q = codebook[codes]  # (N, D); gradient reaches the codebook only through codebook_loss
            codebook_loss = F.mse_loss(z_q, flat.detach())
            commit_loss = self.beta * F.mse_loss(flat, z_q.detach())
            if self.entropy_loss_ratio > 0:
                affinity = -self._distances(flat, codebook)  # (N, K), higher = closer
                entropy_loss = self.entropy_loss_ratio * entropy_loss_from_affinity(affinity)
            else:
                entropy_loss = flat.new_zeros(())
            # straight-through: forward value z_q, gradient of the identity w.r.t. the (normalised) latent
            z_q = flat + (z_q - flat).detach()
        z_q = z_q.view(b, h, w, d).permute(0, 3, 1, 2).to(z.dtype)
        if self.training and self.show_usage:
            self._record_usage(codes)
        return QuantizerOutput(z_q, codes.view(b, h, w), codebook_loss, commit_loss, entropy_loss)

    @torch.no_grad()
    def _record_usage(self, codes: Tensor) -> None:
        # drop the oldest entries, append the newest (at most the buffer length of them)
        n = min(codes.numel(), self.codebook_used.numel())
        recent = codes.reshape(-1)[codes.numel() - n :].to(self.codebook_used.dtype)
        self.codebook_used.copy_(torch.cat([self.codebook_used[n:], recent]))

    def codebook_usage(self) -> float:
        """Fraction of the codebook in the usage record (LlamaGen's metric; initial zeros count as code 0)."""
        if not self.show_usage:
            raise RuntimeError("codebook usage is not recorded (codebook_show_usage=False)")
        return torch.unique(self.codebook_used).numel() / self.codebook_size


def entropy_loss_from_affinity(affinity: Tensor, temperature: float = 0.01) -> Tensor:
    """Low entropy per vector (confident assignments) minus entropy of the batch-average assignment
    (spread over the codebook). ``affinity`` (N, K), higher = closer; returns a scalar."""
    logits = affinity / temperature
    probs = logits.softmax(-1)
    sample_entropy = -(probs * logits.log_softmax(-1)).sum(-1).mean()
    avg_probs = probs.mean(0)
    avg_entropy = -(avg_probs * torch.log(avg_probs + 1e-5)).sum()
    return sample_entropy - avg_entropy


# --------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------


class VQOutput(NamedTuple):
    reconstruction: Tensor  # (B, 3, H, W)
    quantizer: QuantizerOutput


class VQModel(nn.Module):
    """The tokenizer. ``encode``/``decode`` map images <-> codes; ``forward`` is the training path."""

    def __init__(self, config: VQConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quantize = VectorQuantizer(config)
        self.quant_conv = nn.Conv2d(config.z_channels, config.codebook_embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(config.codebook_embed_dim, config.z_channels, 1)

    # ---- pieces (differentiable) ----

    def encode_latent(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) in [-1, 1] -> (B, D, H/f, W/f) pre-quant latent (what the quantizer sees)."""
        self._check_images(images)
        images = images.to(self.quant_conv.weight.dtype)
        return self.quant_conv(self.encoder(images))

    def quantize_latent(self, latent: Tensor) -> QuantizerOutput:
        """Quantize a pre-quant latent; in train mode this also updates ``quantize.codebook_used``."""
        return self.quantize(latent)

    def decode_latent(self, z_q: Tensor) -> Tensor:
        """(B, D, h, w) quantized latent -> (B, 3, h*f, w*f) images."""
        return self.decoder(self.post_quant_conv(z_q))

    def forward(self, images: Tensor) -> VQOutput:
        """Reconstruction plus the quantizer's outputs and losses (for tokenizer training)."""
        quant = self.quantize_latent(self.encode_latent(images))
        return VQOutput(self.decode_latent(quant.z_q), quant)

    # ---- tokenizer interface ----

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) in [-1, 1], H and W divisible by f -> (B, H/f, W/f) int64 codes."""
        return self.quantize.codes(self.encode_latent(images))

    def decode(self, codes: Tensor, grid: tuple[int, int] | None = None) -> Tensor:
        """(B, h, w) codes, or (B, h*w) with ``grid=(h, w)`` (square if omitted) -> (B, 3, h*f, w*f)."""
        codes = self._codes_grid(codes, grid)
        return self.decode_latent(self.quantize.lookup(codes))

    def _check_images(self, images: Tensor) -> None:
        c = self.config.in_channels
        if images.dim() != 4 or images.shape[1] != c:
            raise ValueError(f"images must be (B, {c}, H, W), got shape {tuple(images.shape)}")
        f = self.config.downsample_factor
        h, w = images.shape[-2:]
        if h % f or w % f:
            raise ValueError(
                f"image size {h}x{w} is not divisible by the downsample factor {f}; crop or resize to a multiple of {f}"
            )

    def _codes_grid(self, codes: Tensor, grid: tuple[int, int] | None) -> Tensor:
        if codes.dtype.is_floating_point or codes.dtype.is_complex or codes.dtype == torch.bool:
            raise ValueError(f"codes must be integers, got dtype {codes.dtype}")
        if codes.dim() == 3:
            if grid is not None and tuple(grid) != tuple(codes.shape[1:]):
                raise ValueError(f"grid {tuple(grid)} does not match codes of shape {tuple(codes.shape)}")
        elif codes.dim() == 2:
            n = codes.shape[1]
            if grid is None:
                side = math.isqrt(n)
                if side * side != n:
                    raise ValueError(f"{n} codes per image is not a square grid; pass grid=(h, w)")
                grid = (side, side)
            if len(grid) != 2 or grid[0] * grid[1] != n:
                raise ValueError(f"grid {tuple(grid)} does not hold {n} codes per image")
            codes = codes.reshape(codes.shape[0], *grid)
        else:
            raise ValueError(f"codes must be (B, h, w) or (B, h*w), got shape {tuple(codes.shape)}")
        if codes.numel():
            lo, hi = int(codes.min()), int(codes.max())
            if lo < 0 or hi >= self.config.codebook_size:
                raise ValueError(
                    f"codes range over [{lo}, {hi}], outside the codebook [0, {self.config.codebook_size})"
                )
        return codes.long()

    # ---- checkpoints ----

    @classmethod
    def from_checkpoint(
        cls, path: str | os.PathLike, name: str | None = None, *, trust: bool = False, **overrides: Any
    ) -> VQModel:
        """Load a tokenizer strictly, in eval mode, on the CPU in float32.

        The config is the preset ``name`` when given, else the config stored in our own files
        (``save``); ``overrides`` then replace any of its fields. LlamaGen files store no config,
        so they need ``name`` (e.g. "VQ-16", plus overrides for a custom architecture).
        """
        source = os.fspath(path)
        obj = read_checkpoint(source, trust=trust)
        if checkpoint_family(obj) == "GPT":
            raise CheckpointError(
                f"{source} is a GPT checkpoint, not a VQ tokenizer: pass it as the GPT "
                "(GPT.from_checkpoint; command line: sample --ckpt)"
            )
        stored = _stored_config(obj, source)
        if name is not None:
            config = VQConfig.from_name(name, **overrides)
        elif stored is not None:
            try:
                config = VQConfig.from_dict({**stored, **overrides}, source=source)
            except ValueError as e:
                raise CheckpointError(f"{source}: invalid stored config: {e}") from None
        else:
            raise CheckpointError(
                f"{source} stores no tokenizer config (a LlamaGen-style checkpoint); pass a preset name, "
                f"e.g. VQModel.from_checkpoint(path, 'VQ-16'), plus field overrides for a custom "
                f"architecture. "
                f"Known presets: {', '.join(VQ_PRESETS)}"
            )
        state_dict = extract_state_dict(obj, source=source)
        model = cls(config)
        load_strict(model, state_dict, source=source, explain=partial(explain, config=config))
        return model.eval()

    def save(self, path: str | os.PathLike) -> None:
        """Write ``{"model", "config", "kind"}`` atomically (see ``atomic_save``)."""
        payload = {"model": self.state_dict(), "config": dataclasses.asdict(self.config), "kind": CHECKPOINT_KIND}
        atomic_save(payload, path)


def _stored_config(obj: Any, source: str) -> dict[str, Any] | None:
    # Only our own files (kind "st-ar-vq") carry a config we trust; refuse our other kinds outright.
    if not isinstance(obj, Mapping) or "kind" not in obj or torch.is_tensor(obj.get("kind")):
        return None
    if obj["kind"] != CHECKPOINT_KIND:
        raise CheckpointError(f"{source} is a {obj['kind']!r} checkpoint, not a VQ tokenizer ({CHECKPOINT_KIND!r})")
    config = obj.get("config")
    if not isinstance(config, Mapping):
        raise CheckpointError(f"{source}: {CHECKPOINT_KIND} checkpoint without a config dict")
    return dict(config)


# --------------------------------------------------------------------------------------------------
# Explaining mismatches
# --------------------------------------------------------------------------------------------------

_LEVEL_KEY = re.compile(r"^(encoder|decoder)\.conv_blocks\.(\d+)\.res\.(\d+)\.conv1\.weight$")

# (fact, label) in the order reported
_FACTS = (
    ("codebook_size", "codebook size"),
    ("codebook_embed_dim", "codebook dim"),
    ("z_channels", "z_channels"),
    ("in_channels", "input channels"),
    ("ch", "base width (ch)"),
    ("encoder_widths", "encoder levels / widths"),
    ("decoder_widths", "decoder levels / widths (shallow to deep)"),
    ("encoder_blocks", "encoder ResnetBlocks per level"),
    ("decoder_blocks", "decoder ResnetBlocks per level"),
    ("codebook_used", "quantize.codebook_used buffer"),
)


def state_dict_facts(state_dict: Mapping[str, Tensor]) -> dict[str, Any]:
    """Architecture facts readable from a tokenizer state dict's shapes (facts it lacks are left out)."""

    def dim(key: str, i: int) -> int | None:
        t = state_dict.get(key)
        return int(t.shape[i]) if torch.is_tensor(t) and t.dim() > i else None

    facts: dict[str, Any] = {
        "codebook_size": dim("quantize.embedding.weight", 0),
        "codebook_embed_dim": dim("quantize.embedding.weight", 1),
        "z_channels": dim("quant_conv.weight", 1) or dim("encoder.conv_out.weight", 0),
        "in_channels": dim("encoder.conv_in.weight", 1),
        "ch": dim("encoder.conv_in.weight", 0),
        "codebook_used": "present" if "quantize.codebook_used" in state_dict else "absent",
    }
    widths: dict[str, dict[int, int]] = {"encoder": {}, "decoder": {}}
    blocks: dict[str, dict[int, int]] = {"encoder": {}, "decoder": {}}
    for key, tensor in state_dict.items():
        m = _LEVEL_KEY.match(key)
        if m and torch.is_tensor(tensor) and tensor.dim() > 0:
            part, level, j = m.group(1), int(m.group(2)), int(m.group(3))
            blocks[part][level] = max(blocks[part].get(level, 0), j + 1)
            if j == 0:
                widths[part][level] = int(tensor.shape[0])
    for part in ("encoder", "decoder"):
        if widths[part]:
            levels = sorted(widths[part])
            ordered = [widths[part][i] for i in levels]
            # decoder level 0 is the deepest; report shallow to deep like the config's ch_mult
            facts[f"{part}_widths"] = ordered if part == "encoder" else ordered[::-1]
            counts = sorted(set(blocks[part].values()))
            facts[f"{part}_blocks"] = counts[0] if len(counts) == 1 else counts
    return {k: v for k, v in facts.items() if v is not None}


def config_facts(config: VQConfig) -> dict[str, Any]:
    """The same facts as ``state_dict_facts``, for a config."""
    return {
        "codebook_size": config.codebook_size,
        "codebook_embed_dim": config.codebook_embed_dim,
        "z_channels": config.z_channels,
        "in_channels": config.in_channels,
        "ch": config.ch,
        "encoder_widths": [config.ch * m for m in config.encoder_ch_mult],
        "decoder_widths": [config.ch * m for m in config.decoder_ch_mult],
        "encoder_blocks": config.num_res_blocks,
        "decoder_blocks": config.num_res_blocks + 1,
        "codebook_used": "present" if config.codebook_show_usage else "absent",
    }


def explain(state_dict: Mapping[str, Tensor], config: VQConfig) -> list[str]:
    """Named architecture facts where a file differs from the model, e.g. "codebook size: file 16384,
    model 8192", plus the overrides that would match the file when they can be read off its shapes."""
    file, model = state_dict_facts(state_dict), config_facts(config)
    lines = [
        f"{label}: file {_fmt(file[key])}, model {_fmt(model[key])}"
        for key, label in _FACTS
        if key in file and file[key] != model[key]
    ]
    hint = _matching_overrides(file, config)
    if lines and hint:
        lines.append("to match the file, pass " + ", ".join(f"{k}={v!r}" for k, v in hint.items()))
    return lines


def _fmt(value: Any) -> str:
    return f"{len(value)} levels {value}" if isinstance(value, list) else str(value)


def _matching_overrides(file: Mapping[str, Any], config: VQConfig) -> dict[str, Any]:
    # Config fields that would reproduce the file's shapes, where they can be read off unambiguously.
    found: dict[str, Any] = {
        k: file[k] for k in ("codebook_size", "codebook_embed_dim", "z_channels", "in_channels", "ch") if k in file
    }
    ch = file.get("ch")
    for part in ("encoder", "decoder"):
        widths = file.get(f"{part}_widths")
        if ch and widths and all(w % ch == 0 for w in widths):
            found[f"{part}_ch_mult"] = tuple(w // ch for w in widths)
    if isinstance(file.get("encoder_blocks"), int):
        found["num_res_blocks"] = file["encoder_blocks"]
    if "codebook_used" in file:
        found["codebook_show_usage"] = file["codebook_used"] == "present"
    return {k: v for k, v in found.items() if getattr(config, k) != v}
