"""Opt-in weight-only int8 for sampling: ``quantize_int8_weights(model)`` stores every linear layer of the
transformer blocks as int8 with one scale per output row (symmetric, round to nearest); activations, the
embeddings, the norms and the output head keep the model's dtype.

A decode step at a small batch reads every weight once, so int8 block weights move about a quarter of the
bytes of fp32. Whether that makes a step faster depends on the kernel: on CPU ``Int8Linear`` calls
``aten._weight_int8pack_mm``; elsewhere it multiplies by the weights cast back to the activations' dtype
(which ``torch.compile`` fuses into the matmul). ``benchmarks/sample_speed.py --int8`` measures the speed
and the agreement of the generated tokens with fp32; docs/performance.md has the figures. The default
path never quantizes: golden parity is fp32's.

``pack_fp16_weights(model)`` is the other opt-in route, for CPU decoding: the block linears and the head
keep their weights as fp16, packed once for fbgemm's fp16-weight GEMM, while activations and accumulation
stay fp32. It halves the bytes a decode step reads, with errors at the level of fp16 rounding of the
weights (about 5e-4 relative), where bf16 weights and activations round to 4e-3.
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

    def stored_bytes(self) -> int:
        """Bytes of weights a forward reads (int8 values and scales)."""
        return self.weight_int8.numel() + self.scales.numel() * self.scales.element_size()

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


def fp16_weight_kernel_available() -> bool:
    """Whether this torch has fbgemm's fp16-weight linear (x86 CPU builds do)."""
    engines = torch.backends.quantized.supported_engines
    return ("fbgemm" in engines or "x86" in engines) and hasattr(torch.ops.quantized, "linear_prepack_fp16")


class FP16PackedLinear(nn.Module):
    """A bias-free nn.Linear for CPU sampling whose weights are fp16, prepacked for fbgemm; y = x @ w16.T in fp32.

    The packed weights are an opaque fbgemm object, not a parameter or buffer: the layer takes no gradient,
    does not move with ``.to()``, and is left out of ``state_dict``. Sampling only."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        if linear.bias is not None:
            raise ValueError("FP16PackedLinear takes bias-free linear layers (the GPT's have none)")
        if linear.weight.device.type != "cpu":
            raise ValueError(f"fp16 packed weights are a CPU route; this layer is on {linear.weight.device}")
        w = linear.weight.detach().float().contiguous()
        largest = w.abs().max().item()
        if largest > torch.finfo(torch.float16).max:
            raise ValueError(f"a weight of {largest:.3g} does not fit fp16 (max 65504): keep this model in fp32")
        self._packed = torch.ops.quantized.linear_prepack_fp16(w, None)
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype != torch.float32 or x.device.type != "cpu":
            raise ValueError(
                f"fp16 packed weights take fp32 activations on the CPU, got {x.dtype} on {x.device}: "
                "pack a fp32 model that stays on the CPU"
            )
        flat = x.reshape(-1, self.in_features)
        return torch.ops.quantized.linear_dynamic_fp16(flat, self._packed).view(*x.shape[:-1], self.out_features)

    def dequantized(self) -> Tensor:
        """The weights this layer multiplies by, in fp32 (for tests and error reports)."""
        return torch.ops.quantized.linear_unpack_fp16(self._packed)[0]

    def stored_bytes(self) -> int:
        """Bytes of weights a forward reads (fp16 values)."""
        return 2 * self.in_features * self.out_features

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp16 packed weights"


@torch.no_grad()
def pack_fp16_weights(model: nn.Module) -> nn.Module:
    """Replace, in place, every nn.Linear of the transformer blocks and the output head of a fp32 GPT on the
    CPU by an FP16PackedLinear; returns the model. For eager CPU sampling (``generate(..., compile=False)``)."""
    if getattr(model, "layers", None) is None or not isinstance(getattr(model, "output", None), nn.Linear):
        raise ValueError("pack_fp16_weights expects a GPT (a model with .layers and an .output head)")
    if not fp16_weight_kernel_available():
        raise RuntimeError(
            "this torch build has no fbgemm fp16-weight linear (x86 CPU builds do): sample in fp32 instead"
        )
    param = model.output.weight
    if param.dtype != torch.float32 or param.device.type != "cpu":
        raise ValueError(f"pack_fp16_weights takes a fp32 model on the CPU, got {param.dtype} on {param.device}")
    for block in model.layers:
        for parent in list(block.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(parent, name, FP16PackedLinear(child))
    model.output = FP16PackedLinear(model.output)
    return model
