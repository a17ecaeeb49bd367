"""Training VQ image tokenizers (VQModel): losses, the training loop, held-out metrics."""

from .losses import PatchDiscriminator, PerceptualLoss, hinge_d_loss, hinge_g_loss
from .train import (
    NonFiniteLossError,
    TokenizerTrainConfig,
    code_histogram,
    codebook_usage,
    evaluate,
    perplexity,
    psnr,
    train,
)

__all__ = [
    "NonFiniteLossError",
    "PatchDiscriminator",
    "PerceptualLoss",
    "TokenizerTrainConfig",
    "code_histogram",
    "codebook_usage",
    "evaluate",
    "hinge_d_loss",
    "hinge_g_loss",
    "perplexity",
    "psnr",
    "train",
]
