"""Linear layers: dense, and weight-only int8 / int4 with bf16 activations.

Quantized layers use torch's CPU kernels (`_weight_int8pack_mm`, per-output-channel scales;
`_weight_int4pack_mm_for_cpu`, group-wise scale and zero). Those kernels win when few rows
are multiplied (decode is memory bound: int4 reads 4x fewer bytes than bf16); with many rows
a dense GEMM wins, so a layer may keep its dense weight for batches above `max_quant_rows`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from talkloop.engine.config import Quantization


class Linear(nn.Module):
    def __init__(self, out_features: int, in_features: int, bias: bool, dtype: torch.dtype) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype), False)
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype), False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class QuantizedLinear(nn.Module):
    """y = x @ dequant(W).T + b, with W stored as int8 rows or packed int4 groups."""

    def __init__(
        self, dense: Linear, bits: int, group_size: int = 32, max_quant_rows: int | None = 8
    ) -> None:
        super().__init__()
        weight = dense.weight.detach().float()
        self.bits = bits
        self.group_size = group_size
        self.out_dtype = dense.weight.dtype
        self.bias = dense.bias
        self.max_quant_rows = max_quant_rows
        # The dense copy serves large batches; None means always use the quantized kernel.
        self.dense = dense.weight.detach() if max_quant_rows else None
        if bits == 8:
            self.qweight, self.scales = quantize_int8(weight)
        elif bits == 4:
            self.qweight, self.scales = quantize_int4(weight, group_size)
        else:
            raise ValueError(f"bits must be 4 or 8, got {bits}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dense is not None and self.max_quant_rows and x.shape[0] > self.max_quant_rows:
            return F.linear(x, self.dense, self.bias)
        x16 = x.to(torch.bfloat16)
        if self.bits == 8:
            y = torch._weight_int8pack_mm(x16, self.qweight, self.scales)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(
                x16, self.qweight, self.group_size, self.scales
            )
        y = y.to(self.out_dtype)
        return y + self.bias if self.bias is not None else y


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: W ~= q * scale[:, None]."""
    scales = (weight.abs().amax(dim=1) / 127.0).clamp(min=1e-8)
    q = (weight / scales[:, None]).round().clamp(-127, 127).to(torch.int8)
    return q, scales.to(torch.bfloat16)


def quantize_int4(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric group-wise uint4: W ~= q * scale + min, q in 0..15 (GGUF Q4_1's form).

    The kernel computes (q - 8) * scale + zero, so zero = min + 8 * scale.
    Returns the packed weight and scales_and_zeros [K / group, N, 2] in bf16.
    """
    out_features, in_features = weight.shape
    groups = weight.view(out_features, in_features // group_size, group_size)
    low, high = groups.amin(dim=-1), groups.amax(dim=-1)
    scales = ((high - low) / 15.0).clamp(min=1e-8)
    q = ((groups - low[..., None]) / scales[..., None]).round().clamp(0, 15)
    q = q.to(torch.int32).view(out_features, in_features)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    zeros = low + 8 * scales
    scales_and_zeros = torch.stack([scales, zeros], dim=-1).transpose(0, 1).contiguous()
    return packed, scales_and_zeros.to(torch.bfloat16)


def can_quantize(layer: Linear, bits: int, group_size: int) -> bool:
    out_features, in_features = layer.weight.shape
    if bits == 4:
        return in_features % group_size == 0 and out_features % 16 == 0
    return True


def quantize_linears(
    model: nn.Module, quantization: Quantization, max_quant_rows: int | None = 8
) -> int:
    """Replace every `Linear` in `model` by a quantized one; returns how many were replaced."""
    if quantization == "none":
        return 0
    bits = 8 if quantization == "int8" else 4
    replaced = 0
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, Linear):
                child_bits = bits if can_quantize(child, bits, 32) else 8
                setattr(module, child_name, QuantizedLinear(child, child_bits, 32, max_quant_rows))
                replaced += 1
    return replaced
