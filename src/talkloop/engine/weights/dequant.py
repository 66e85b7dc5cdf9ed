"""GGUF quantized blocks → float32 torch tensors, vectorised over all blocks at once.

`QuantizedTensor` keeps a tensor's raw blocks (one row of blocks per logical row) so callers
can keep weights quantized in memory; `dequantize()` expands them. Block layouts follow
ggml-quants.c (and `gguf.quants`, the numpy reference the tests compare against). This module
does not read files or know tensor names beyond using them in errors.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from talkloop.engine.errors import ModelLoadError, UnsupportedModelError

QK_K = 256  # values per k-quant super-block

Dequantizer = Callable[[torch.Tensor], torch.Tensor]  # [num_blocks, type_size] u8 -> f32


@dataclass(frozen=True)
class QuantizedTensor:
    """Raw GGUF blocks of one tensor; `shape` is logical and row-major (torch order)."""

    name: str
    qtype: GGMLQuantizationType
    shape: tuple[int, ...]
    data: torch.Tensor  # uint8 [num_rows, bytes_per_row]; a row never splits a block

    @property
    def num_bytes(self) -> int:
        return self.data.numel()

    def dequantize(self) -> torch.Tensor:
        """The float32 tensor of `shape` these blocks encode, in fresh memory (never a view)."""
        dequantizer = _DEQUANTIZERS.get(self.qtype)
        if dequantizer is None:
            raise UnsupportedModelError(_unsupported_message(self.name, self.qtype.name))
        _, type_size = GGML_QUANT_SIZES[self.qtype]
        blocks = self.data.reshape(-1, type_size)
        return dequantizer(blocks).reshape(self.shape)


def quantized_tensor(
    name: str, qtype: int | GGMLQuantizationType, shape: tuple[int, ...], raw: object
) -> QuantizedTensor:
    """Wrap raw bytes (numpy array of any dtype, or torch uint8) as a checked `QuantizedTensor`."""
    qtype = _ggml_type(name, qtype)
    if qtype not in _DEQUANTIZERS:
        raise UnsupportedModelError(_unsupported_message(name, qtype.name))
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    row_len = shape[-1] if shape else 1
    if row_len % block_size != 0:
        raise ModelLoadError(
            f"tensor {name!r}: row length {row_len} is not a multiple of the "
            f"{qtype.name} block size {block_size}"
        )
    num_rows = math.prod(shape) // row_len
    bytes_per_row = row_len // block_size * type_size
    data = _as_bytes(name, raw)
    if data.numel() != num_rows * bytes_per_row:
        raise ModelLoadError(
            f"tensor {name!r}: {qtype.name} shape {list(shape)} needs "
            f"{num_rows * bytes_per_row} bytes, the data has {data.numel()} (truncated file?)"
        )
    return QuantizedTensor(name, qtype, tuple(shape), data.reshape(num_rows, bytes_per_row))


def dequantize(
    raw: object, qtype: int | GGMLQuantizationType, shape: tuple[int, ...], name: str = "tensor"
) -> torch.Tensor:
    """Raw GGUF bytes of `qtype` → float32 tensor of logical `shape`."""
    return quantized_tensor(name, qtype, shape, raw).dequantize()


def _ggml_type(name: str, qtype: int | GGMLQuantizationType) -> GGMLQuantizationType:
    try:
        return GGMLQuantizationType(int(qtype))
    except ValueError:
        raise UnsupportedModelError(_unsupported_message(name, f"type id {int(qtype)}")) from None


def _unsupported_message(name: str, type_name: str) -> str:
    supported = ", ".join(t.name for t in _DEQUANTIZERS)
    return f"tensor {name!r} uses GGML type {type_name}, which is not supported ({supported} are)"


def _as_bytes(name: str, raw: object) -> torch.Tensor:
    """A flat uint8 torch view of `raw` (no copy for contiguous numpy arrays or memmaps)."""
    if isinstance(raw, torch.Tensor):
        return raw.contiguous().reshape(-1).view(torch.uint8)
    if isinstance(raw, np.ndarray):
        flat = np.ascontiguousarray(raw).reshape(-1).view(np.uint8)
        with warnings.catch_warnings():
            # NOTE: read-only memmaps are fine: dequantizing reads the view, never writes it.
            warnings.filterwarnings("ignore", message=".*not writable.*")
            return torch.from_numpy(flat)
    raise ModelLoadError(f"tensor {name!r}: expected a numpy array or torch tensor of bytes")


# --- field helpers; every `blocks` is uint8 [num_blocks, type_size] ---------------------------


def _f16(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """The fp16 at byte `start` of each block, as float32 [num_blocks, 1]."""
    return blocks[:, start : start + 2].contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """[..., n] bytes → [..., 2n]: all low nibbles, then all high nibbles (ggml order)."""
    return torch.cat([qs & 0x0F, qs >> 4], dim=-1)


def _bits(qh: torch.Tensor) -> torch.Tensor:
    """[num_blocks, 4] bytes (a little-endian u32) → [num_blocks, 32] bits, bit j = value j."""
    shifts = torch.arange(8, dtype=torch.uint8)
    return ((qh.unsqueeze(-1) >> shifts) & 1).reshape(qh.shape[0], 32)


# --- plain floats -----------------------------------------------------------------------------


def _f32(blocks: torch.Tensor) -> torch.Tensor:
    return blocks.contiguous().view(torch.float32).clone()  # the bytes may be a read-only map


def _f16_values(blocks: torch.Tensor) -> torch.Tensor:
    return blocks.contiguous().view(torch.float16).float()


def _bf16(blocks: torch.Tensor) -> torch.Tensor:
    return blocks.contiguous().view(torch.bfloat16).float()  # exact: bf16 is f32's top half


# --- 32-value blocks --------------------------------------------------------------------------


def _q8_0(blocks: torch.Tensor) -> torch.Tensor:
    # [d: f16][qs: 32 x i8]; x = d * q
    return blocks[:, 2:].view(torch.int8).float().mul_(_f16(blocks, 0))


def _q4_0(blocks: torch.Tensor) -> torch.Tensor:
    # [d: f16][qs: 16 B, two 4-bit values each]; x = d * (q - 8)
    q = _nibbles(blocks[:, 2:]).to(torch.int8) - 8
    return q.float().mul_(_f16(blocks, 0))


def _q4_1(blocks: torch.Tensor) -> torch.Tensor:
    # [d: f16][m: f16][qs: 16 B]; x = d * q + m
    return _nibbles(blocks[:, 4:]).float().mul_(_f16(blocks, 0)).add_(_f16(blocks, 2))


def _q5_0(blocks: torch.Tensor) -> torch.Tensor:
    # [d: f16][qh: u32, 5th bits][qs: 16 B]; x = d * (q - 16)
    q = _nibbles(blocks[:, 6:]) | (_bits(blocks[:, 2:6]) << 4)
    return (q.to(torch.int8) - 16).float().mul_(_f16(blocks, 0))


def _q5_1(blocks: torch.Tensor) -> torch.Tensor:
    # [d: f16][m: f16][qh: u32][qs: 16 B]; x = d * q + m
    q = _nibbles(blocks[:, 8:]) | (_bits(blocks[:, 4:8]) << 4)
    return q.float().mul_(_f16(blocks, 0)).add_(_f16(blocks, 2))


# --- 256-value k-quant super-blocks -----------------------------------------------------------


def _k_scales_mins(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K 12-byte packed 6-bit scales and mins → two float32 [num_blocks, 8, 1]."""
    packed = scales.reshape(-1, 3, 4)
    d, m, md = packed[:, 0], packed[:, 1], packed[:, 2]  # each [num_blocks, 4]
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc.float().unsqueeze(-1), mn.float().unsqueeze(-1)


def _k_low_nibbles(qs: torch.Tensor) -> torch.Tensor:
    """128 bytes → [num_blocks, 8, 32]: per 32-byte chunk, low nibbles then high nibbles."""
    chunks = qs.reshape(-1, 4, 1, 32)
    return torch.cat([chunks & 0x0F, chunks >> 4], dim=2).reshape(-1, 8, 32)


def _q4_k(blocks: torch.Tensor) -> torch.Tensor:
    # [d: f16][dmin: f16][scales: 12 B][qs: 128 B]; x = d*sc * q - dmin*m per 32 values
    sc, mn = _k_scales_mins(blocks[:, 4:16])
    scale = _f16(blocks, 0).unsqueeze(-1) * sc  # [num_blocks, 8, 1]
    offset = _f16(blocks, 2).unsqueeze(-1) * mn
    q = _k_low_nibbles(blocks[:, 16:]).float()
    return q.mul_(scale).sub_(offset).reshape(-1, QK_K)


def _q5_k(blocks: torch.Tensor) -> torch.Tensor:
    # [d][dmin][scales: 12 B][qh: 32 B][qs: 128 B]; sub-block i takes bit i of qh as 5th bit
    sc, mn = _k_scales_mins(blocks[:, 4:16])
    scale = _f16(blocks, 0).unsqueeze(-1) * sc
    offset = _f16(blocks, 2).unsqueeze(-1) * mn
    shifts = torch.arange(8, dtype=torch.uint8).reshape(1, 8, 1)
    high = (blocks[:, 16:48].unsqueeze(1) >> shifts) & 1  # [num_blocks, 8, 32]
    q = (_k_low_nibbles(blocks[:, 48:]) | (high << 4)).float()
    return q.mul_(scale).sub_(offset).reshape(-1, QK_K)


def _q6_k(blocks: torch.Tensor) -> torch.Tensor:
    # [ql: 128 B][qh: 64 B][scales: 16 x i8][d: f16]; x = d * scale * (q - 32) per 16 values
    ql = blocks[:, :128].reshape(-1, 2, 1, 64)
    low = torch.cat([ql & 0x0F, ql >> 4], dim=2).reshape(-1, 8, 32)
    qh = blocks[:, 128:192].reshape(-1, 2, 1, 32)
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8).reshape(1, 1, 4, 1)
    high = ((qh >> shifts) & 3).reshape(-1, 8, 32)
    q = ((low | (high << 4)).to(torch.int8) - 32).reshape(-1, 16, 16).float()
    scales = blocks[:, 192:208].view(torch.int8).float()
    d = (_f16(blocks, 208) * scales).unsqueeze(-1)  # [num_blocks, 16, 1]
    return q.mul_(d).reshape(-1, QK_K)


_DEQUANTIZERS: dict[GGMLQuantizationType, Dequantizer] = {
    GGMLQuantizationType.F32: _f32,
    GGMLQuantizationType.F16: _f16_values,
    GGMLQuantizationType.BF16: _bf16,
    GGMLQuantizationType.Q8_0: _q8_0,
    GGMLQuantizationType.Q4_0: _q4_0,
    GGMLQuantizationType.Q4_1: _q4_1,
    GGMLQuantizationType.Q5_0: _q5_0,
    GGMLQuantizationType.Q5_1: _q5_1,
    GGMLQuantizationType.Q4_K: _q4_k,
    GGMLQuantizationType.Q5_K: _q5_k,
    GGMLQuantizationType.Q6_K: _q6_k,
}
