"""Losses for tokenizer training beyond the quantizer's own: reconstruction, a PatchGAN
discriminator with hinge losses, and a perceptual loss on a user-supplied feature network.

Nothing here downloads weights. The perceptual loss runs a feature network that the user saved
locally (``torch.export.save`` or ``torch.jit.save``), so no torchvision is needed at training time.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Cap of the adaptive GAN weight (VQGAN's value): early on the GAN gradient at the decoder output
# can be near zero, and the ratio of norms would explode.
MAX_ADAPTIVE_WEIGHT = 1e4
# Added to the GAN gradient norm in the adaptive weight's denominator (VQGAN's value).
ADAPTIVE_EPS = 1e-4


def reconstruction_loss(reconstruction: Tensor, target: Tensor, kind: str = "l2") -> Tensor:
    """Mean per-pixel error between (B, 3, H, W) images: squared ("l2") or absolute ("l1")."""
    if kind == "l2":
        return F.mse_loss(reconstruction, target)
    if kind == "l1":
        return F.l1_loss(reconstruction, target)
    raise ValueError(f"reconstruction loss must be 'l2' or 'l1', got {kind!r}")


# --------------------------------------------------------------------------------------------------
# PatchGAN
# --------------------------------------------------------------------------------------------------


class PatchDiscriminator(nn.Module):
    """A PatchGAN discriminator (pix2pix's design): strided 4x4 convs, one real/fake logit per patch.

    ``num_layers`` stride-2 convs halve the image each time, then two stride-1 convs; for a 32x32
    input and 3 layers the output is (B, 1, 2, 2), for 256x256 it is (B, 1, 30, 30). GroupNorm
    instead of pix2pix's BatchNorm: every image is normalised on its own, so real and fake images
    can share one batch (one DDP forward per step) without leaking statistics into each other.
    """

    def __init__(self, in_channels: int = 3, channels: int = 64, num_layers: int = 3) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"discriminator needs at least one layer, got {num_layers}")
        layers: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        width = channels
        for i in range(1, num_layers + 1):
            out = channels * 2 ** min(i, 3)  # widths stop growing at 8x, as in pix2pix
            stride = 2 if i < num_layers else 1  # the last of these keeps the resolution
            layers += [
                nn.Conv2d(width, out, 4, stride=stride, padding=1, bias=False),
                nn.GroupNorm(_groups(out), out),
                nn.LeakyReLU(0.2),
            ]
            width = out
        layers.append(nn.Conv2d(width, 1, 4, stride=1, padding=1))
        self.net = nn.Sequential(*layers)
        for m in self.modules():  # pix2pix init: N(0, 0.02) convs, N(1, 0.02) norm gains
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.GroupNorm):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, images: Tensor) -> Tensor:  # (B, 3, H, W) -> (B, 1, h, w) logits
        return self.net(images)

    @staticmethod
    def min_image_size(num_layers: int) -> int:
        # each stride-2 conv halves the side; the two 4x4 stride-1 convs then take 1 pixel each
        return 3 * 2**num_layers


def _groups(channels: int) -> int:
    # 32 groups like the tokenizer where the width allows, else the largest divisor below it
    return next(g for g in range(min(32, channels), 0, -1) if channels % g == 0)


def hinge_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """Discriminator hinge loss: push real logits above +1 and fake logits below -1."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def hinge_g_loss(logits_fake: Tensor) -> Tensor:
    """Generator side of the hinge GAN: raise the discriminator's logits on reconstructions."""
    return -logits_fake.mean()


def adaptive_gan_weight(nll_loss: Tensor, g_loss: Tensor, last_layer: Tensor) -> Tensor:
    """VQGAN's balance: |grad nll| / |grad g| at the decoder's last weight, so the GAN term moves
    the output about as much as the reconstruction terms do. Detached scalar in [0, 1e4]."""
    nll_grad = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    weight = nll_grad.norm() / (g_grad.norm() + ADAPTIVE_EPS)
    return weight.clamp(0.0, MAX_ADAPTIVE_WEIGHT).detach()


# --------------------------------------------------------------------------------------------------
# Perceptual loss
# --------------------------------------------------------------------------------------------------


class PerceptualLoss(nn.Module):
    """Distance between deep features of two images, LPIPS-style without the learned per-channel weights.

    ``path`` is a saved feature network: a ``torch.export`` program (``torch.export.save``, usually
    .pt2) or a TorchScript module (``torch.jit.save``). It takes (B, 3, H, W) images in [-1, 1] and
    returns one feature map (B, C, h, w), or a list / tuple / dict of them (e.g. the five VGG16
    stages LPIPS uses); it must do its own input normalisation. For each map the features are
    unit-normalised over channels, and the loss is the squared difference summed over channels and
    averaged over batch and positions, summed over maps. The network is frozen.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        super().__init__()
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"perceptual weights file not found: {path}. The perceptual loss needs a local saved feature "
                "network (torch.export or TorchScript; nothing is downloaded); see docs/tokenizer.md, or set "
                "--perceptual-weight 0"
            )
        self.path = path
        self.net = load_feature_network(path)
        for p in self.net.parameters():
            p.requires_grad_(False)

    def train(self, mode: bool = True) -> PerceptualLoss:
        # frozen: never switch the network's dropout / batch-norm to training mode. (An exported
        # program has its mode fixed at export and refuses .train() / .eval().)
        self.training = mode
        return self

    def forward(self, reconstruction: Tensor, target: Tensor) -> Tensor:  # (B, 3, H, W) x2 -> scalar
        with torch.no_grad():
            target_features = _feature_list(self.net(target), self.path)
        features = _feature_list(self.net(reconstruction), self.path)
        if len(features) != len(target_features):
            raise ValueError(f"{self.path}: feature extractor returned a different number of maps per call")
        loss = reconstruction.new_zeros((), dtype=torch.float32)
        for f, t in zip(features, target_features):
            diff = F.normalize(f.float(), dim=1, eps=1e-10) - F.normalize(t.float(), dim=1, eps=1e-10)
            loss = loss + diff.pow(2).sum(1).mean()  # sum over channels, mean over (B, h, w)
        return loss


def load_feature_network(path: str) -> nn.Module:
    """A torch.export program (preferred: TorchScript is deprecated from torch 2.10) or a TorchScript
    module, on the CPU. Neither format runs pickled Python code on load."""
    try:
        return torch.export.load(path).module()
    except Exception:  # not an exported program (the formats share the zip container): try TorchScript
        pass
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return torch.jit.load(path, map_location="cpu").eval()
    except (RuntimeError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(
            f"{path} is neither a torch.export program nor a TorchScript module ({first}); save the feature "
            "network with torch.export.save(torch.export.export(net.eval(), (example_images,)), path)"
        ) from None


def _feature_list(output, source: str) -> list[Tensor]:
    if torch.is_tensor(output):
        maps = [output]
    elif isinstance(output, Mapping):
        maps = list(output.values())
    elif isinstance(output, Sequence):
        maps = list(output)
    else:
        raise ValueError(f"{source}: feature extractor returned {type(output).__name__}; expected tensor(s)")
    for m in maps:
        if not torch.is_tensor(m) or m.dim() < 2:
            raise ValueError(f"{source}: every feature map must be a (B, C, ...) tensor, got {type(m).__name__}")
    return maps
