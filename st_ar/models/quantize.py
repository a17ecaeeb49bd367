"""Opt-in weight-only int8 for sampling: ``quantize_int8_weights(model)`` stores every linear layer of the
transformer blocks as int8 with one scale per output row (symmetric, round to nearest); activations, the
embeddings, the norms and the output head keep the model's dtype.

A decode step at a small batch reads every weight once, so int8 block weights move about a quarter of the
bytes of fp32. Whether that makes a step faster depends on the kernel: on CPU ``Int8Linear`` calls
``aten._weight_int8pack_mm``; elsewhere it multiplies by the weights cast back to the activations' dtype
(which ``torch.compile`` fuses into the matmul). ``benchmarks/sample_speed.py --int8`` measures the speed
and the agreement of the generated tokens with fp32; docs/performance.md has the figures. The default
path never quantizes: golden parity is fp32's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Int8Linear(nn.Module):
    """A bias-free nn.Linear with int8 weights and a per-output-row scale: y = (x @ q.T) * scale."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        if linear.bias is not None:
            raise ValueError("Int8Linear takes bias-free linear layers (the GPT's have none)")
        w = linear.weight.detach().float()
        scale = w.abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny) / 127
        self.register_buffer("weight_int8", torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scales", scale.to(linear.weight.dtype))
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: Tensor) -> Tensor:
        scales = self.scales.to(x.dtype)
        if x.device.type == "cpu":
            flat = x.reshape(-1, self.in_features)
            return torch.ops.aten._weight_int8pack_mm(flat, self.weight_int8, scales).view(*x.shape[:-1], -1)
        return F.linear(x, self.weight_int8.to(x.dtype)) * scales

    def dequantized(self) -> Tensor:
        """The weights this layer multiplies by, in fp32 (for tests and error reports)."""
        return self.weight_int8.float() * self.scales.float()[:, None]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 weights"


@torch.no_grad()
def quantize_int8_weights(model: nn.Module) -> nn.Module:
    """Replace, in place, every nn.Linear inside ``model.layers`` (the transformer blocks) by an Int8Linear;
    returns the model. For sampling only: the int8 weights take no gradient."""
    blocks = getattr(model, "layers", None)
    if blocks is None:
        raise ValueError("quantize_int8_weights expects a GPT (a model with .layers)")
    for block in blocks:
        for parent in list(block.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(parent, name, Int8Linear(child))
    return model
