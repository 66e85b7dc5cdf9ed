"""Linear layers: dense, and int8 / int4 quantized.

A quantized layer has two kernels, chosen per call by the number of rows:
- up to `max_quant_rows` rows (single-stream decode, speculative verification, and for
  native int4 layers batched decode up to `NATIVE_INT4_ROWS`): int8 layers use
  `_weight_int8pack_mm` (bf16 activations, per-output-channel scales); int4 layers use the
  native int4 x int8 kernel (`native.int4_linear`: GGUF Q4_1's form, activations
  quantized per group of 32) where it is built, else `_weight_int4pack_mm_for_cpu`. Decode is
  memory bound, and int4 reads 4x fewer bytes than bf16. Torch's kernels do not reuse a
  weight across rows (at 16 rows they are slower than a dense bf16 GEMM); the native one does.
- above it (prefill, batched decode): W8A8. The activations are quantized per row (symmetric
  int8, dynamic scale) and multiplied by the layer's per-channel int8 weight with
  `torch._int_mm` (oneDNN's VNNI kernels), and the int32 result is scaled back. Measured here
  (2 cores, AVX-512 VNNI): 4.3x faster than bf16 for 1,024 rows of a 576x1536 layer, 2.9x
  for 32 rows. An int4 layer keeps an int8 copy of its weight for this path (half the bytes of
  the dense copy it replaces). A few input channels of some layers carry massive activations
  (one channel of SmolLM2's layer-12 attention input sits near 10 where the rest are near
  0.4), and one int8 scale per row then starves every other channel: alone, W8A8 cost the
  bundled model 3.8% perplexity. So each layer keeps its `OUTLIER_CHANNELS` largest input
  channels, found once at load on a calibration text (`engine/data/calibration.txt`), in
  float32 beside the int8 product: +0.5% to +0.8% perplexity instead.
- without VNNI (AVX2 CPUs, `cpu.has_int8_dot()` false) `torch._int_mm` is slow (17 tok/s of
  prefill on a 2-core Zen 3), so there is no W8A8: native int4 layers take every batch through
  their kernel (AVX2 form: 466 tok/s of prefill at 256 rows where dense float32 ran 355), and
  int8 layers widen their weight to float32 for one dense GEMM above `max_quant_rows`.
The quality guard (tests/integration/test_quantization_quality.py) measures both kernels.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from talkloop.engine import cpu, native
from talkloop.engine.config import Quantization
from talkloop.engine.native import OutlierChannels

OUTLIER_CHANNELS = 16  # input channels per layer kept in float32 on the W8A8 path
# Rows up to which int4 layers use the native int4 kernel instead of W8A8: at 32 rows a whole
# batched-decode run was 5% faster with it (510 vs 483 tok/s, same process, three rounds).
NATIVE_INT4_ROWS = 64


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
        self,
        dense: Linear,
        bits: int,
        group_size: int = 32,
        max_quant_rows: int | None = 8,
        channel_range: torch.Tensor | None = None,
    ) -> None:
        """`channel_range`: max |x| per input channel seen in calibration; its largest
        channels become the W8A8 path's float32 outliers (none without it)."""
        super().__init__()
        weight = dense.weight.detach().float()
        self.bits = bits
        self.group_size = group_size
        self.out_dtype = dense.weight.dtype
        self.bias = dense.bias
        # Batches above this many rows take the W8A8 path; None: weight-only for every batch.
        self.max_quant_rows = max_quant_rows
        self.int8_weight: torch.Tensor | None = None  # [N, K] int8, for W8A8
        self.int8_scales: torch.Tensor | None = None  # [N] float32
        self.int4_packed: torch.Tensor | None = None  # int4_linear.cpp's form, for int4
        # Large batches as W8A8 (int8 dot products, VNNI) or, without them, a float32 GEMM.
        self.w8a8 = cpu.has_int8_dot()
        if bits == 8:
            self.qweight, self.scales = quantize_int8(weight)
            if max_quant_rows:
                self.int8_weight, self.int8_scales = self.qweight, self.scales.float()
        elif bits == 4:
            # The native kernel's packed form where it is built, else torch's.
            if native.int4_supported() and group_size == native.INT4_GROUP:
                self.int4_packed = native.int4_pack(*native.int4_quantize(weight))
                # It reuses each weight block across rows: batched decode. Without VNNI it
                # takes every batch, prefill too (no int8 copy): W8A8 is not fast there.
                if max_quant_rows and self.w8a8:
                    self.max_quant_rows = max(max_quant_rows, NATIVE_INT4_ROWS)
                elif max_quant_rows:
                    self.max_quant_rows = None
            else:
                self.qweight, self.scales = quantize_int4(weight, group_size)
            if self.max_quant_rows:
                self.int8_weight, scales = quantize_int8(weight)
                self.int8_scales = scales.float()
        else:
            raise ValueError(f"bits must be 4 or 8, got {bits}")
        self.outliers: OutlierChannels | None = None
        count = min(OUTLIER_CHANNELS, weight.shape[1] // 16)
        if self.max_quant_rows and self.w8a8 and channel_range is not None and count > 0:
            self.outliers = OutlierChannels.of(weight, channel_range.topk(count).indices)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        if self.int8_weight is not None and self.max_quant_rows and rows > self.max_quant_rows:
            return self._w8a8(x) if self.w8a8 else self._dequantized(x)
        if self.int4_packed is not None:
            return native.int4_linear(x, self.int4_packed, self.bias).to(self.out_dtype)
        x16 = x.to(torch.bfloat16)
        if self.bits == 8:
            y = torch._weight_int8pack_mm(x16, self.qweight, self.scales)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(
                x16, self.qweight, self.group_size, self.scales
            )
        y = y.to(self.out_dtype)
        return y + self.bias if self.bias is not None else y

    def _dequantized(self, x: torch.Tensor) -> torch.Tensor:
        """Many rows without VNNI: the int8 weight widened to float32, per call, for one dense
        GEMM. The widening is not free: on a 2-core Zen 3 an int8 model decoded 32 streams at
        85 tok/s against 105 for 8 (bench/results/engine_avx2.md); int4 layers avoid it."""
        assert self.int8_weight is not None and self.int8_scales is not None
        y = F.linear(x.float(), self.int8_weight.float()) * self.int8_scales
        if self.bias is not None:
            y = y.to(self.out_dtype) + self.bias
        return y.to(self.out_dtype)

    def _w8a8(self, x: torch.Tensor) -> torch.Tensor:
        assert self.int8_weight is not None and self.int8_scales is not None
        flat = x.reshape(-1, x.shape[-1])
        q, row_scales, outlier_values = native.quantize_rows(flat, self.outliers)
        acc = torch._int_mm(q, self.int8_weight.t())
        y = native.dequantize(
            acc,
            row_scales,
            self.int8_scales,
            self.bias,
            self.out_dtype,
            self.outliers,
            outlier_values,
        )
        return y.view(*x.shape[:-1], y.shape[-1])


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


def channel_ranges(model: nn.Module, run: Callable[[], object]) -> dict[str, torch.Tensor]:
    """max |x| per input channel of every dense `Linear` in `model` (by module name), over
    whatever `run()` feeds through it."""
    ranges: dict[str, torch.Tensor] = {}

    def observe(name: str) -> Callable[[nn.Module, tuple[torch.Tensor, ...]], None]:
        def hook(_: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0].detach()
            seen = x.reshape(-1, x.shape[-1]).abs().amax(dim=0).float()
            ranges[name] = torch.maximum(ranges[name], seen) if name in ranges else seen

        return hook

    handles = [
        module.register_forward_pre_hook(observe(name))
        for name, module in model.named_modules()
        if isinstance(module, Linear)
    ]
    try:
        with torch.inference_mode():
            run()
    finally:
        for handle in handles:
            handle.remove()
    return ranges


def quantize_linears(
    model: nn.Module,
    quantization: Quantization,
    max_quant_rows: int | None = 8,
    ranges: dict[str, torch.Tensor] | None = None,
) -> int:
    """Replace every `Linear` in `model` by a quantized one; returns how many were replaced.
    `ranges` (from `channel_ranges`) picks each layer's outlier channels for W8A8."""
    if quantization == "none":
        return 0
    bits = 8 if quantization == "int8" else 4
    ranges = ranges or {}
    replaced = 0
    for module_name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, Linear):
                child_bits = bits if can_quantize(child, bits, 32) else 8
                name = f"{module_name}.{child_name}" if module_name else child_name
                quantized = QuantizedLinear(
                    child, child_bits, 32, max_quant_rows, channel_range=ranges.get(name)
                )
                setattr(module, child_name, quantized)
                replaced += 1
    return replaced
