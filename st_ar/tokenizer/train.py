"""Train a VQ tokenizer (VQModel) on images: reconstruction + codebook + commitment losses, with
optional entropy, PatchGAN, perceptual and EMA; resumable, single process or torchrun (DDP).

    config = TokenizerTrainConfig(dataset="mnist", out="runs/vq-mnist", preset="VQ-mnist", steps=1000)
    results = train(config)               # -> the held-out metrics also written to out/eval.json
    vq = VQModel.from_checkpoint("runs/vq-mnist/tokenizer.pt")

A run folder that holds checkpoints/last.pt resumes from it, as `st-ar train` does: only the
settings in ``TokenizerTrainConfig.CHANGEABLE_ON_RESUME`` may differ, and the number of processes
must be the same. Precision, parameter groups, the finite-loss check, random streams, the resume
rules and the batch order are st_ar/train/runtime.py's and sampler.py's; the EMA weights follow the
model by st_ar/teacher.py's ``update_ema`` on its "warmup" schedule.

Run folder:

    RUN_DIR/config.json               resolved training config (and the tokenizer's VQConfig)
    RUN_DIR/checkpoints/last.pt       everything needed to resume (see save_checkpoint)
    RUN_DIR/tokenizer.pt              the tokenizer alone (VQModel.save; EMA weights when EMA is on)
    RUN_DIR/eval.json                 held-out PSNR, codebook usage and perplexity at the end
    RUN_DIR/recon/step_XXXXXXX.png    originals (odd rows) above their reconstructions (even rows)
    RUN_DIR/metrics.jsonl, tensorboard/   scalars (RunLogger)

A step is: forward the tokenizer, sum the losses, backward, clip, AdamW; then, when the GAN is on,
one discriminator step on the same real images and the (detached) reconstructions. The data order
depends only on (seed, step, world size) (``StepBatches``), and the checkpoint holds every other
piece of state, so N steps + resume + N steps gives the weights of 2N uninterrupted steps.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Dataset

from ..data.datasets import open_dataset
from ..data.transforms import center_crop_adm, fit_to_multiple, image_to_tensor
from ..distributed import DistInfo, GracefulStop, all_reduce_mean, any_rank, cleanup_distributed, init_distributed
from ..images import save_grid, to_uint8
from ..models.loading import CheckpointError, atomic_save, read_checkpoint
from ..models.vq import QuantizerOutput, VQConfig, VQModel
from ..progress import progress_bar
from ..runfolder import lock_run_folder, remove_stale_temp_files, write_json_atomic
from ..runlog import RunLogger
from ..teacher import build_teacher, ema_schedule, update_ema
from ..train import NonFiniteLoss, runtime
from ..train.runtime import autocast_for, capture_rng, check_finite, check_resumable, param_groups, restore_rng
from ..train.sampler import StepBatches
from .losses import (
    PatchDiscriminator,
    PerceptualLoss,
    adaptive_gan_weight,
    hinge_d_loss,
    hinge_g_loss,
    reconstruction_loss,
)

CHECKPOINT_KIND = "st-ar-vq-train"
# A reconstruction identical to its original has infinite PSNR; count it as this many dB instead.
PSNR_CAP_DB = 100.0
# Images in the reconstruction grid (shown as 2 rows of originals and 2 of reconstructions).
GRID_IMAGES = 16
GRID_ROW = 8
EVAL_SCALARS = ("psnr", "psnr_of_mean_mse", "codebook_usage", "perplexity")


@dataclass
class TokenizerTrainConfig:
    """Everything a tokenizer run depends on; written to config.json and into every checkpoint.
    On the command line each field is ``field=value`` (st_ar/settings.py)."""

    # Fields that may change when a run is resumed: they do not change what a step computes
    # (except that `steps` is where a cosine schedule ends).
    CHANGEABLE_ON_RESUME: ClassVar[tuple[str, ...]] = (
        "out",
        "steps",
        "eval_every",
        "eval_samples",
        "save_every",
        "log_every",
        "num_workers",
        "device",
    )

    out: str = ""  # run folder
    # ---- data ----
    dataset: str = "mnist"  # "mnist", "fashion-mnist", or a folder of class subfolders (see open_dataset)
    data_root: str | None = None  # where mnist / fashion-mnist files live, if not the default places
    train_split: str = "train"
    eval_split: str = "test"  # held-out images for PSNR / usage / perplexity
    image_size: int = 32  # smaller images are padded (black), larger ones ADM-centre-cropped to this
    # ---- model ----
    preset: str = "VQ-mnist"  # a VQ_PRESETS name
    vq_args: dict[str, Any] = field(default_factory=dict)  # VQConfig fields overriding the preset
    # ---- optimisation ----
    steps: int = 300  # total optimizer steps (resume with a larger value to extend); 300 = the CPU MNIST demo
    batch_size: int = 64  # global: split evenly over the ranks
    lr: float = 1e-3
    lr_schedule: str = "constant"  # constant | cosine (to 0 at `steps`; changing steps on resume changes it)
    warmup_steps: int = 0  # linear warm-up from 0
    beta1: float = 0.9
    beta2: float = 0.95  # LlamaGen's tokenizer betas
    weight_decay: float = 0.0  # AdamW, on conv / linear weights only (not norms, biases, codebook)
    grad_clip: float = 1.0  # max global grad norm; 0 = no clipping
    precision: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | fp32 | bf16
    # ---- losses ----
    recon_loss: str = "l2"  # l2 | l1
    codebook_weight: float = 1.0  # weight of the codebook loss |z_q - sg(z)|^2
    commit_beta: float = 0.25  # commitment weight (VQConfig.commit_loss_beta)
    entropy_weight: float = 0.0  # entropy loss weight (VQConfig.entropy_loss_ratio)
    gan_weight: float = 0.0  # 0 = no discriminator
    gan_start_step: int = 0  # discriminator and GAN loss start at this step
    gan_adaptive: bool = True  # scale the GAN term by VQGAN's adaptive weight (else by gan_weight only)
    disc_lr: float | None = None  # None = lr
    disc_channels: int = 64
    disc_layers: int = 3
    perceptual_weight: float = 0.0
    perceptual_weights: str | None = None  # saved feature network (torch.export / TorchScript); needed if weight > 0
    # ---- codebook ----
    dead_code_reinit: int = 50  # every N steps, re-seed codes unused since the last check; 0 = off (LlamaGen)
    # ---- EMA ----
    ema_decay: float = 0.0  # 0 = off; else EMA of the tokenizer weights, used for eval and tokenizer.pt
    # ---- run ----
    seed: int = 0
    eval_every: int = 100  # 0 = only at the end
    eval_samples: int = 1000  # held-out images per periodic eval (the final eval uses all); 0 = all
    save_every: int = 100  # 0 = only at the end (and on Ctrl-C)
    log_every: int = 10
    num_workers: int = -1  # DataLoader workers per rank; -1 = auto (0 on CPU, else up to 8)
    device: str = "auto"

    def __post_init__(self) -> None:
        checks = {
            "image_size": self.image_size > 0,
            "steps": self.steps >= 0,
            "batch_size": self.batch_size > 0,
            "lr": self.lr > 0,
            "warmup_steps": self.warmup_steps >= 0,
            "grad_clip": self.grad_clip >= 0,
            "codebook_weight": self.codebook_weight >= 0,
            "commit_beta": self.commit_beta >= 0,
            "entropy_weight": self.entropy_weight >= 0,
            "gan_weight": self.gan_weight >= 0,
            "gan_start_step": self.gan_start_step >= 0,
            "perceptual_weight": self.perceptual_weight >= 0,
            "dead_code_reinit": self.dead_code_reinit >= 0,
            "ema_decay": 0 <= self.ema_decay < 1,
            "eval_every": self.eval_every >= 0,
            "eval_samples": self.eval_samples >= 0,
            "save_every": self.save_every >= 0,
            "log_every": self.log_every > 0,
            "num_workers": self.num_workers >= -1,
            "disc_channels": self.disc_channels > 0,
            "disc_layers": self.disc_layers > 0,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ValueError(", ".join(f"{n} = {getattr(self, n)!r} is out of range" for n in bad))
        choices = {
            "lr_schedule": ("constant", "cosine"),
            "recon_loss": ("l2", "l1"),
            "precision": ("auto", "fp32", "bf16"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if self.perceptual_weight > 0 and not self.perceptual_weights:
            raise ValueError(
                "perceptual_weight > 0 needs perceptual_weights: a local feature network file (torch.export or "
                "TorchScript; nothing is downloaded)"
            )
        for key in ("commit_loss_beta", "entropy_loss_ratio"):
            if key in self.vq_args:
                raise ValueError(f"set {key} with commit_beta / entropy_weight, not in vq_args")

    def vq_config(self) -> VQConfig:
        """The tokenizer architecture: the preset, vq_args on top, and the loss weights the quantizer applies."""
        return VQConfig.from_name(
            self.preset,
            **{**self.vq_args, "commit_loss_beta": self.commit_beta, "entropy_loss_ratio": self.entropy_weight},
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, fields: dict[str, Any]) -> TokenizerTrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(fields) - known)
        if unknown:
            raise ValueError(f"unknown tokenizer training field(s) {unknown}")
        return cls(**fields)


class NonFiniteLossError(NonFiniteLoss):
    """A loss or gradient became NaN / inf; the run stopped without saving over the last checkpoint.
    (A NonFiniteLoss, so ``st-ar`` reports it like the GPT trainer's.)"""


# --------------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------------


def psnr(reference: Tensor, reconstruction: Tensor) -> Tensor:
    """Per-image PSNR in dB of (B, 3, H, W) images in [-1, 1] -> (B,).

    Both are first rounded to 8 bits as a PNG would store them (``to_uint8``'s rounding), so this is
    the PSNR of the pixels a person sees, with peak 255. Identical images count as PSNR_CAP_DB.
    """
    a = ((reference.detach().float().clamp(-1, 1) + 1) * 127.5).round()
    b = ((reconstruction.detach().float().clamp(-1, 1) + 1) * 127.5).round()
    mse = (a - b).pow(2).flatten(1).mean(1)  # (B,) in 8-bit units squared
    floor = 255.0**2 / 10 ** (PSNR_CAP_DB / 10)  # the mse at which the cap applies
    return 10 * torch.log10(255.0**2 / mse.clamp_min(floor))


def code_histogram(codes: Tensor, codebook_size: int) -> Tensor:
    """How often each code occurs in ``codes`` (any shape) -> (codebook_size,) int64."""
    return torch.bincount(codes.reshape(-1).long(), minlength=codebook_size)


def codebook_usage(histogram: Tensor) -> float:
    """Fraction of the codebook that occurs at least once."""
    return (histogram > 0).sum().item() / histogram.numel()


def perplexity(histogram: Tensor) -> float:
    """exp(entropy) of the code distribution: the number of equally likely codes it is worth.
    Ranges from 1 (one code) to the codebook size (all used equally)."""
    counts = histogram.double()
    total = counts.sum()
    if total == 0:
        return 0.0
    p = counts[counts > 0] / total
    return math.exp(-(p * p.log()).sum().item())


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------


def prepare_image(img, image_size: int) -> Tensor:
    """A dataset image -> (3, S, S) float in [-1, 1].

    PIL images no larger than S on both sides are centred on black (MNIST 28 -> 32: the digits'
    own background, no resampling); larger ones get the ADM centre crop (LlamaGen's). Tensors are
    taken as already prepared (3, S, S) in [-1, 1], for tests and in-memory data.
    """
    if torch.is_tensor(img):
        if tuple(img.shape) != (3, image_size, image_size):
            raise ValueError(f"image tensor must be (3, {image_size}, {image_size}), got {tuple(img.shape)}")
        return img.float()
    w, h = img.size
    if w <= image_size and h <= image_size:
        img = fit_to_multiple(img, image_size, mode="pad")
    else:
        img = center_crop_adm(img, image_size)
    return image_to_tensor(img)


class TokenizerImages(Dataset):
    """Wrap a dataset of (image, label) items (or bare images) -> (3, S, S) tensors in [-1, 1]."""

    def __init__(self, base, image_size: int) -> None:
        self.base, self.image_size = base, image_size

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> Tensor:
        item = self.base[i]
        img = item[0] if isinstance(item, (tuple, list)) else item
        return prepare_image(img, self.image_size)


def _ignore_sigint(_worker_id: int) -> None:
    # Ctrl-C reaches the workers too; let only the main process react (it stops at a step boundary)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


# --------------------------------------------------------------------------------------------------
# Training state
# --------------------------------------------------------------------------------------------------


class _Autoencoder(nn.Module):
    """The tokenizer's training path as one module call, so DDP sees a single forward per step
    and the step also gets the pre-quantization latent (for dead-code re-initialisation)."""

    def __init__(self, vq: VQModel) -> None:
        super().__init__()
        self.vq = vq

    def forward(self, images: Tensor) -> tuple[Tensor, QuantizerOutput, Tensor]:
        latent = self.vq.encode_latent(images)  # (B, D, h, w)
        quant = self.vq.quantize_latent(latent)
        return self.vq.decode_latent(quant.z_q), quant, latent  # (B, 3, H, W), ..., (B, D, h, w)


@dataclass
class TrainState:
    config: TokenizerTrainConfig
    dist: DistInfo
    model: VQModel
    forward: nn.Module  # _Autoencoder, DDP-wrapped when distributed
    optimizer: torch.optim.Optimizer
    ema: VQModel | None = None
    disc: PatchDiscriminator | None = None
    disc_forward: nn.Module | None = None  # disc, DDP-wrapped when distributed
    disc_optimizer: torch.optim.Optimizer | None = None
    perceptual: PerceptualLoss | None = None
    dead_counts: Tensor | None = None  # (K,) code occurrences since the last dead-code check
    step: int = 0  # optimizer steps done
    autocast: Callable[[], Any] = contextlib.nullcontext  # () -> context manager (runtime.autocast_for)
    ema_decay: Callable[[int], float] | None = None  # step -> EMA decay, when EMA is on

    @property
    def eval_model(self) -> VQModel:
        return self.ema if self.ema is not None else self.model


# decay conv / linear weights only; norms, biases and the codebook (which the quantizer keeps
# l2-normalised anyway) are left alone
NO_DECAY = ("embedding",)


def build_state(config: TokenizerTrainConfig, dist_info: DistInfo) -> TrainState:
    """Fresh model, EMA, discriminator, optimizers; the same initial weights on every rank."""
    device = dist_info.device
    torch.manual_seed(config.seed)
    model = VQModel(config.vq_config()).to(device).train()
    if config.image_size % model.config.downsample_factor:
        raise ValueError(
            f"image_size {config.image_size} is not divisible by the tokenizer's downsample factor "
            f"{model.config.downsample_factor}"
        )
    betas = (config.beta1, config.beta2)
    state = TrainState(
        config=config,
        dist=dist_info,
        model=model,
        forward=_Autoencoder(model),
        # fused (CPU and CUDA): the per-tensor loop was a sixth of a step on a 2-core CPU
        optimizer=torch.optim.AdamW(
            param_groups(model, config.weight_decay, NO_DECAY), lr=config.lr, betas=betas, fused=True
        ),
        autocast=autocast_for(config.precision, device),
    )
    if config.ema_decay > 0:
        state.ema = build_teacher(model)  # a frozen copy in eval mode
        state.ema_decay = ema_schedule("warmup", config.ema_decay, config.steps)
    if config.gan_weight > 0:
        smallest = PatchDiscriminator.min_image_size(config.disc_layers)
        if config.image_size < smallest:
            raise ValueError(
                f"a discriminator with {config.disc_layers} layers needs images of at least {smallest} px; "
                f"lower disc_layers (--disc-layers) for {config.image_size} px images"
            )
        state.disc = PatchDiscriminator(3, config.disc_channels, config.disc_layers).to(device).train()
        state.disc_forward = state.disc
        state.disc_optimizer = torch.optim.AdamW(
            param_groups(state.disc, config.weight_decay, NO_DECAY),
            lr=config.disc_lr or config.lr,
            betas=betas,
            fused=True,
        )
    if config.perceptual_weight > 0:
        state.perceptual = PerceptualLoss(config.perceptual_weights).to(device)
    if config.dead_code_reinit > 0:
        state.dead_counts = torch.zeros(model.config.codebook_size, dtype=torch.long, device=device)
    if dist_info.distributed:
        ids = [device.index] if device.type == "cuda" else None
        # DDP also copies rank 0's buffers (the codebook_used record) to the others before each
        # forward: harmless (they do not affect outputs), and the saved record is rank 0's anyway
        state.forward = DDP(state.forward, device_ids=ids)
        if state.disc is not None:
            state.disc_forward = DDP(state.disc, device_ids=ids)
    return state


def lr_at(config: TokenizerTrainConfig, step: int) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warm-up, then constant or cosine to 0."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    if config.lr_schedule == "cosine":
        span = max(1, config.steps - config.warmup_steps)
        progress = min(1.0, (step - config.warmup_steps) / span)
        return config.lr * 0.5 * (1 + math.cos(math.pi * progress))
    return config.lr


# --------------------------------------------------------------------------------------------------
# One step
# --------------------------------------------------------------------------------------------------


def train_step(state: TrainState, images: Tensor) -> dict[str, Tensor]:
    """One optimizer step of the tokenizer (and of the discriminator when the GAN is active).

    Returns detached scalar losses and metrics. Raises NonFiniteLossError *before* the tokenizer's
    optimizer step if any rank's loss or gradient is not finite, so the weights stay the last good ones.
    """
    cfg, step = state.config, state.step
    gan_on = state.disc is not None and step >= cfg.gan_start_step
    lr = lr_at(cfg, step)
    for opt in (state.optimizer, state.disc_optimizer):
        if opt is not None:
            for group in opt.param_groups:
                group["lr"] = lr if opt is state.optimizer else lr * (cfg.disc_lr or cfg.lr) / cfg.lr

    total, recon, quant, latent, logs = _tokenizer_loss(state, images, gan_on)
    state.optimizer.zero_grad(set_to_none=True)
    total.backward()
    max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(state.model.parameters(), max_norm)
    logs.update(
        {
            "loss/total": total,
            "loss/codebook": quant.codebook_loss,
            "loss/commit": quant.commit_loss,
            "loss/entropy": quant.entropy_loss,
            "grad_norm": grad_norm,
            "lr": torch.tensor(lr),
        }
    )
    _check_finite(state, [total, grad_norm], logs)
    state.optimizer.step()
    if gan_on:
        _discriminator_step(state, images, recon.detach(), logs)

    # ---- bookkeeping ----
    codes = quant.codes.detach()
    if state.dead_counts is not None:
        state.dead_counts += code_histogram(codes, state.model.config.codebook_size)
        if (step + 1) % cfg.dead_code_reinit == 0:
            logs["codebook/reinit"] = torch.tensor(float(reinit_dead_codes(state, latent.detach())))
    if state.ema is not None:
        update_ema(state.ema, state.model, state.ema_decay(step), buffers=True)
    state.step = step + 1
    logs["psnr/train"] = psnr(images, recon).mean()
    logs["codes"] = codes  # (B, h, w), for the usage statistics of the log window
    return {k: v.detach() if torch.is_tensor(v) else v for k, v in logs.items()}


def _tokenizer_loss(state: TrainState, images: Tensor, gan_on: bool):
    """The tokenizer's forward and total loss -> (total, recon (B, 3, H, W) fp32, QuantizerOutput,
    latent (B, D, h, w), named losses)."""
    cfg = state.config
    with state.autocast():
        recon, quant, latent = state.forward(images)  # (B, 3, H, W), QuantizerOutput, (B, D, h, w)
        recon = recon.float()
        rec_loss = reconstruction_loss(recon, images, cfg.recon_loss)
        nll = rec_loss
        logs: dict[str, Tensor] = {"loss/recon": rec_loss}
        if state.perceptual is not None:
            p_loss = state.perceptual(recon, images)
            nll = nll + cfg.perceptual_weight * p_loss
            logs["loss/perceptual"] = p_loss
        vq_loss = cfg.codebook_weight * quant.codebook_loss + quant.commit_loss + quant.entropy_loss
        total = nll + vq_loss
        if gan_on:
            state.disc.requires_grad_(False)  # the generator step must not touch the discriminator
            g_loss = hinge_g_loss(state.disc(recon))  # raw module: no DDP reducer for a no-grad call
            state.disc.requires_grad_(True)
            if cfg.gan_adaptive:
                last = state.model.decoder.conv_out.weight
                weight = cfg.gan_weight * adaptive_gan_weight(nll, g_loss, last)
            else:
                weight = torch.tensor(cfg.gan_weight, device=images.device)
            total = total + weight * g_loss
            logs["loss/gan_g"] = g_loss
            logs["gan/weight"] = weight
    return total, recon, quant, latent, logs


def _discriminator_step(state: TrainState, images: Tensor, fakes: Tensor, logs: dict[str, Tensor]) -> None:
    """One discriminator step: real images vs the reconstructions just made, in one batch."""
    cfg = state.config
    with state.autocast():
        logits = state.disc_forward(torch.cat([images, fakes])).float()
        logits_real, logits_fake = logits.chunk(2)
        d_loss = hinge_d_loss(logits_real, logits_fake)
    state.disc_optimizer.zero_grad(set_to_none=True)
    d_loss.backward()
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(state.disc.parameters(), cfg.grad_clip)
    logs.update({"loss/gan_d": d_loss, "gan/logits_real": logits_real.mean(), "gan/logits_fake": logits_fake.mean()})
    _check_finite(state, [d_loss], logs)
    state.disc_optimizer.step()


def _check_finite(state: TrainState, values: list[Tensor], logs: dict[str, Tensor]) -> None:
    check_finite(
        values,
        step=state.step,
        detail=lambda: ", ".join(
            f"{k}={v.item():.4g}" for k, v in logs.items() if torch.is_tensor(v) and v.numel() == 1
        ),
        device=state.dist.device,
        error=NonFiniteLossError,
    )


@torch.no_grad()
def reinit_dead_codes(state: TrainState, latent: Tensor) -> int:
    """Move every code unused since the last check onto a random latent vector of this batch.

    A code that no encoder output is nearest to gets no gradient ever again (the codebook loss
    only pulls chosen codes), so it is wasted; placing it on an actual latent makes it nearest to
    something. Rank 0 picks the vectors and broadcasts the codebook. The Adam moments of the moved
    rows are zeroed so stale momentum does not drag them back. Returns the number of codes moved.
    """
    counts = state.dead_counts
    if dist.is_initialized():
        dist.all_reduce(counts)
    dead = (counts == 0).nonzero().squeeze(1)  # (n_dead,)
    counts.zero_()
    if dead.numel() == 0:
        return 0
    quantizer = state.model.quantize
    weight = quantizer.embedding.weight  # (K, D), stored unnormalised
    flat = latent.permute(0, 2, 3, 1).reshape(-1, latent.shape[1]).float()  # (B*h*w, D)
    if quantizer.l2_norm:
        flat = torch.nn.functional.normalize(flat, dim=-1)
    # a generator seeded by (seed, step): the choice is reproducible and independent of the global RNG
    gen = torch.Generator(device="cpu").manual_seed(state.config.seed * 1_000_003 + state.step)
    pick = torch.randint(flat.shape[0], (dead.numel(),), generator=gen).to(flat.device)
    new = flat[pick]
    # several dead codes may land on one vector: a small jitter keeps them apart
    new = new + 1e-3 * new.abs().mean() * torch.randn(new.shape, generator=gen).to(new.device)
    weight[dead] = new.to(weight.dtype)
    if dist.is_initialized():
        dist.broadcast(weight.data, src=0)
    opt_state = state.optimizer.state.get(weight, {})
    for key in ("exp_avg", "exp_avg_sq"):
        if key in opt_state:
            opt_state[key][dead] = 0
    return dead.numel()


# --------------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(
    model: VQModel, dataset: Dataset, *, batch_size: int = 64, device: torch.device | str = "cpu", num_workers: int = 0
) -> dict[str, float]:
    """PSNR, codebook usage and perplexity of ``model`` on ``dataset`` (items: (3, S, S) tensors).

    Under torchrun each rank takes every world-th image and the sums are all-reduced, so the
    numbers are those of the whole set, each image counted once.
    """
    was_training = model.training
    model.eval()
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    shard = torch.utils.data.Subset(dataset, range(rank, len(dataset), world))
    loader = DataLoader(shard, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    k = model.config.codebook_size
    hist = torch.zeros(k, dtype=torch.long, device=device)
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # psnr sum, mse sum, image count
    for images in loader:
        images = images.to(device, non_blocking=True)
        recon, quant = model(images)
        mse = ((images.clamp(-1, 1) - recon.float().clamp(-1, 1)) / 2).pow(2).flatten(1).mean(1)  # on [0, 1]
        sums[0] += psnr(images, recon).double().sum()
        sums[1] += mse.double().sum()
        sums[2] += len(images)
        hist += code_histogram(quant.codes, k)
    if dist.is_initialized():
        dist.all_reduce(sums)
        dist.all_reduce(hist)
    model.train(was_training)
    n = max(1.0, sums[2].item())
    mean_mse = sums[1].item() / n
    return {
        "psnr": sums[0].item() / n,
        # the PSNR of the average error (on [0, 1] images, not 8-bit-rounded): lower than the mean
        # of per-image PSNRs, which rewards the many easy images
        "psnr_of_mean_mse": 10 * math.log10(1.0 / mean_mse) if mean_mse > 0 else PSNR_CAP_DB,
        "codebook_usage": codebook_usage(hist),
        "codes_used": int((hist > 0).sum().item()),
        "codebook_size": k,
        "perplexity": perplexity(hist),
        "images": int(sums[2].item()),
    }


@torch.no_grad()
def save_reconstruction_grid(model: VQModel, images: Tensor, path: str) -> None:
    """Originals and reconstructions in alternating rows of GRID_ROW images."""
    was_training = model.training
    recon = model.eval()(images).reconstruction
    model.train(was_training)
    rows = []
    for i in range(0, len(images), GRID_ROW):
        rows += [to_uint8(images[i : i + GRID_ROW]), to_uint8(recon[i : i + GRID_ROW])]
    save_grid(np.concatenate(rows), path, nrow=GRID_ROW)


# --------------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------------


def checkpoint_path(run_dir: str) -> str:
    return runtime.checkpoint_path(run_dir)


def save_checkpoint(state: TrainState) -> str:
    """Write RUN_DIR/checkpoints/last.pt and RUN_DIR/tokenizer.pt (atomic; every rank calls this,
    rank 0 writes).

    last.pt: {"kind", "step", "config", "vq_config", "world_size", "model", "ema", "discriminator",
    "optimizer", "disc_optimizer", "dead_code_counts", "rng"}; entries for features that are off are
    None; "rng" holds every rank's streams (runtime.capture_rng). tokenizer.pt is ``VQModel.save``
    of the EMA weights when EMA is on, else of the model.
    """
    path = checkpoint_path(state.config.out)
    dead_counts = state.dead_counts
    if dead_counts is not None and dist.is_initialized():
        dead_counts = dead_counts.clone()
        dist.all_reduce(dead_counts)  # every rank counts its own codes; store the total (on rank 0 at load)
    rng = capture_rng(state.dist)  # a collective
    if not state.dist.is_main:
        return path
    payload = {
        "kind": CHECKPOINT_KIND,
        "step": state.step,
        "config": state.config.to_dict(),
        "vq_config": dataclasses.asdict(state.model.config),
        "world_size": state.dist.world_size,
        "model": state.model.state_dict(),
        "ema": state.ema.state_dict() if state.ema is not None else None,
        "discriminator": state.disc.state_dict() if state.disc is not None else None,
        "optimizer": state.optimizer.state_dict(),
        "disc_optimizer": state.disc_optimizer.state_dict() if state.disc_optimizer is not None else None,
        "dead_code_counts": dead_counts,
        "rng": rng,
    }
    atomic_save(payload, path)
    state.eval_model.save(os.path.join(state.config.out, "tokenizer.pt"))
    return path


def read_training_checkpoint(path: str) -> dict[str, Any]:
    obj = read_checkpoint(path)
    if not isinstance(obj, dict) or obj.get("kind") != CHECKPOINT_KIND:
        raise CheckpointError(f"{path} is not a tokenizer training checkpoint (kind {CHECKPOINT_KIND!r})")
    return obj


def load_checkpoint(state: TrainState, path: str) -> None:
    """Restore everything save_checkpoint wrote, strictly; the configs must describe the same run,
    on as many processes."""
    obj = read_training_checkpoint(path)
    check_resumable(obj["config"], state.config, path)
    rng = obj["rng"]
    if isinstance(rng, dict):  # files from before every rank's streams were kept: rank 0's, which all ranks took
        rng = [{"torch": rng["torch"]}] * obj.get("world_size", 1)
    restore_rng(rng, state.dist, path)
    state.model.load_state_dict(obj["model"], strict=True)
    state.optimizer.load_state_dict(obj["optimizer"])
    if state.ema is not None:
        state.ema.load_state_dict(obj["ema"], strict=True)
    if state.disc is not None:
        state.disc.load_state_dict(obj["discriminator"], strict=True)
        state.disc_optimizer.load_state_dict(obj["disc_optimizer"])
    if state.dead_counts is not None:
        state.dead_counts.copy_(obj["dead_code_counts"] if state.dist.is_main else 0)
    state.step = int(obj["step"])


def stored_config(run_dir: str) -> dict[str, Any] | None:
    """The training config stored in RUN_DIR's checkpoint; None when RUN_DIR holds no run yet."""
    path = checkpoint_path(run_dir)
    return dict(read_training_checkpoint(path)["config"]) if os.path.exists(path) else None


# --------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------


def train(
    config: TokenizerTrainConfig,
    *,
    resume: bool | None = None,
    train_set=None,
    eval_set=None,
    stop_at: int | None = None,
) -> dict[str, Any]:
    """Train a tokenizer run in ``config.out``, or continue it when the folder holds one (its
    checkpoints/last.pt); returns the final held-out metrics (also in RUN_DIR/eval.json).

    ``resume=True`` insists on continuing (an error when there is nothing to resume); otherwise the
    folder decides. ``train_set`` / ``eval_set`` replace the datasets named by the config (items:
    (image, label) or bare images; PIL images or prepared (3, S, S) tensors). ``stop_at`` ends this
    call after that many steps, with a checkpoint and no final eval, as if interrupted (returns
    {"step": ...}). Under torchrun every rank calls this. Ctrl-C (or SIGTERM) finishes the current
    step, saves, and raises KeyboardInterrupt.
    """
    if not config.out:
        raise ValueError("config.out (the run folder) is required")
    if resume and not os.path.exists(checkpoint_path(config.out)):
        raise FileNotFoundError(f"nothing to resume: {checkpoint_path(config.out)} does not exist")
    dist_info = init_distributed(config.device)
    # Denormal floats (tiny gradients, Adam moments) make CPU math 10-100x slower: a 16 px test run
    # took 6 s a step instead of 0.1 s. Flushing them to zero changes nothing measurable.
    torch.set_flush_denormal(True)
    try:
        lock = lock_run_folder(config.out, "--out", dist_info)  # on rank 0; released when the run ends
        with deterministic_on_cpu(dist_info.device), contextlib.closing(lock):
            if dist_info.is_main:
                remove_stale_temp_files(config.out, os.path.dirname(checkpoint_path(config.out)))
            return _train(config, dist_info, train_set, eval_set, stop_at)
    finally:
        torch.set_flush_denormal(False)  # the process default
        cleanup_distributed()


@contextlib.contextmanager
def deterministic_on_cpu(device: torch.device):
    """Deterministic kernels while training on the CPU, so a resumed run repeats an uninterrupted one
    bit for bit. The one op that needs it: the codebook's gradient is a scatter-add over the chosen
    codes, which on several threads sums in a varying order (1e-10 differences that grow).
    Costs about 5% of a VQ-mnist step. On GPUs runs are not bit-reproducible anyway; left alone."""
    if device.type != "cpu":
        yield
        return
    before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])


@dataclass
class _Data:
    train: Dataset  # TokenizerImages
    eval: Dataset  # the whole held-out set (final eval)
    periodic_eval: Dataset  # its first eval_samples images
    grid: Tensor  # (n, 3, S, S) on the device: the reconstruction grid's originals
    per_rank: int  # images per rank per step
    workers: int


def _open_data(config: TokenizerTrainConfig, dist_info: DistInfo, train_set, eval_set) -> _Data:
    if config.batch_size % dist_info.world_size:
        raise ValueError(f"batch_size {config.batch_size} does not split evenly over {dist_info.world_size} ranks")
    device = dist_info.device
    train_images = TokenizerImages(
        train_set if train_set is not None else open_dataset(config.dataset, config.train_split, root=config.data_root),
        config.image_size,
    )
    eval_images = TokenizerImages(
        eval_set if eval_set is not None else open_dataset(config.dataset, config.eval_split, root=config.data_root),
        config.image_size,
    )
    periodic = eval_images
    if 0 < config.eval_samples < len(eval_images):
        periodic = torch.utils.data.Subset(eval_images, range(config.eval_samples))
    grid = torch.stack([eval_images[i] for i in range(min(GRID_IMAGES, len(eval_images)))]).to(device)
    workers = config.num_workers if config.num_workers >= 0 else (0 if device.type == "cpu" else 8)
    return _Data(train_images, eval_images, periodic, grid, config.batch_size // dist_info.world_size, workers)


def _train(config: TokenizerTrainConfig, dist_info: DistInfo, train_set, eval_set, stop_at: int | None) -> dict:
    out, main = config.out, dist_info.is_main
    ckpt = checkpoint_path(out)
    data = _open_data(config, dist_info, train_set, eval_set)
    state = build_state(config, dist_info)
    resumed = os.path.exists(ckpt)
    if resumed:
        load_checkpoint(state, ckpt)
    if main:
        os.makedirs(out, exist_ok=True)
        write_json_atomic(
            os.path.join(out, "config.json"), {"train": config.to_dict(), "vq": dataclasses.asdict(state.model.config)}
        )
    start = state.step
    sampler = StepBatches(
        len(data.train), data.per_rank, rank=dist_info.rank, world_size=dist_info.world_size, seed=config.seed
    )
    sampler.set_steps(start, config.steps if stop_at is None else min(stop_at, config.steps))
    loader = DataLoader(
        data.train,
        batch_sampler=sampler,
        num_workers=data.workers,
        pin_memory=dist_info.device.type == "cuda",
        worker_init_fn=_ignore_sigint if data.workers > 0 else None,
    )
    log = RunLogger(out, enabled=main, resume_step=start)  # drops lines after the checkpoint
    t0 = time.perf_counter()
    interrupted, saved_step = _run_steps(state, loader, data, log, saved_step=start if resumed else -1)
    train_seconds = time.perf_counter() - t0
    if saved_step != state.step:
        save_checkpoint(state)
    if interrupted or state.step < config.steps:
        log.close()
        if main:
            print(f"stopped at step {state.step}; saved {ckpt}. Run the same command again to continue.")
        if interrupted:
            raise KeyboardInterrupt
        return {"step": state.step}
    return _final_evaluation(state, data, log, train_seconds, custom_eval=eval_set is not None)


def _run_steps(state: TrainState, loader: DataLoader, data: _Data, log: RunLogger, saved_step: int) -> tuple[bool, int]:
    """The steps ``loader``'s sampler serves, with logs, checkpoints and periodic evals.
    Returns (interrupted, the step of the last checkpoint written, -1 for none)."""
    config, device, main = state.config, state.dist.device, state.dist.is_main
    bar = progress_bar(
        total=config.steps, initial=state.step, unit="step", desc="tokenizer", disable=not main, dynamic_ncols=True
    )
    k = state.model.config.codebook_size
    window = torch.zeros(k, dtype=torch.long, device=device)  # code counts since the last log line
    try:
        with GracefulStop() as stop:
            batches = iter(loader)
            for _ in range(len(loader)):
                try:
                    images = next(batches)
                except (RuntimeError, StopIteration):
                    if stop.requested:  # a DataLoader worker may die of the same Ctrl-C
                        return True, saved_step
                    raise
                try:
                    logs = train_step(state, images.to(device, non_blocking=True))
                except NonFiniteLossError as e:
                    kept = f"the last good checkpoint {checkpoint_path(config.out)} (step {saved_step}) is intact"
                    if saved_step < 0:
                        kept = "no checkpoint was saved yet"
                    raise NonFiniteLossError(
                        f"{e}. Stopped without saving; {kept}. Try a lower lr or some warmup_steps, "
                        "and check the images for NaN."
                    ) from None
                window += code_histogram(logs.pop("codes"), k)
                bar.update(1)
                step = state.step
                if "codebook/reinit" in logs:  # only on re-initialisation steps
                    log.scalars(step, {"codebook/reinit": float(logs.pop("codebook/reinit"))})
                if step % config.log_every == 0 or step == config.steps:
                    _log_window(state, logs, window, log, bar)
                if config.save_every and step % config.save_every == 0:
                    save_checkpoint(state)
                    saved_step = step
                if config.eval_every and step % config.eval_every == 0 and step != config.steps:
                    _periodic_evaluation(state, data, log, bar)
                if any_rank(stop.requested, device):
                    return True, saved_step
    except BaseException:
        log.close()  # flush the scalars so far (NaN stop, errors)
        raise
    finally:
        bar.close()
    return False, saved_step


def _log_window(state: TrainState, logs: dict[str, Tensor], window: Tensor, log: RunLogger, bar) -> None:
    """One log line: this step's scalars and the codebook statistics since the last line (all ranks)."""
    scalars = {k: float(v) for k, v in logs.items()}
    if dist.is_initialized():
        dist.all_reduce(window)
    scalars["codebook/usage_window"] = codebook_usage(window)
    scalars["codebook/perplexity_window"] = perplexity(window)
    window.zero_()
    scalars = all_reduce_mean(scalars, state.dist.device)
    log.scalars(state.step, scalars)
    bar.set_postfix(
        loss=f"{scalars['loss/total']:.4f}",
        rec=f"{scalars['loss/recon']:.4f}",
        psnr=f"{scalars['psnr/train']:.1f}",
        used=f"{scalars['codebook/usage_window']:.0%}",
        refresh=False,
    )


def _periodic_evaluation(state: TrainState, data: _Data, log: RunLogger, bar) -> None:
    metrics = evaluate(state.eval_model, data.periodic_eval, **_eval_kwargs(state, data))
    log.scalars(state.step, {f"eval/{name}": metrics[name] for name in EVAL_SCALARS})
    if state.dist.is_main:
        path = os.path.join(state.config.out, "recon", f"step_{state.step:07d}.png")
        save_reconstruction_grid(state.eval_model, data.grid, path)
        bar.write(
            f"step {state.step}: held-out PSNR {metrics['psnr']:.2f} dB, codebook usage "
            f"{metrics['codebook_usage']:.1%}, perplexity {metrics['perplexity']:.1f} ({metrics['images']} images)"
        )


def _eval_kwargs(state: TrainState, data: _Data) -> dict[str, Any]:
    return dict(batch_size=data.per_rank * 2, device=state.dist.device, num_workers=data.workers)


def _final_evaluation(
    state: TrainState, data: _Data, log: RunLogger, train_seconds: float, custom_eval: bool
) -> dict[str, Any]:
    """The whole held-out set, once the run is complete: eval.json, the last grid, a summary line."""
    config, out = state.config, state.config.out
    t1 = time.perf_counter()
    results = evaluate(state.eval_model, data.eval, **_eval_kwargs(state, data))
    results.update(
        {
            "step": state.step,
            "dataset": "custom" if custom_eval else config.dataset,
            "split": config.eval_split,
            "weights": "ema" if state.ema is not None else "model",
            "train_seconds": round(train_seconds, 1),
            "eval_seconds": round(time.perf_counter() - t1, 1),
        }
    )
    log.scalars(state.step, {f"eval/{name}": results[name] for name in EVAL_SCALARS})
    log.close()
    if state.dist.is_main:
        save_reconstruction_grid(state.eval_model, data.grid, os.path.join(out, "recon", f"step_{state.step:07d}.png"))
        write_json_atomic(os.path.join(out, "eval.json"), results)
        print(
            f"held-out ({results['split']}, {results['images']} images, {results['weights']} weights): "
            f"PSNR {results['psnr']:.2f} dB (of mean MSE {results['psnr_of_mean_mse']:.2f} dB), "
            f"codebook usage {results['codebook_usage']:.1%} ({results['codes_used']}/{results['codebook_size']}), "
            f"perplexity {results['perplexity']:.1f}"
        )
        print(f"wrote {os.path.join(out, 'tokenizer.pt')}, {os.path.join(out, 'eval.json')}")
    return results
