"""Rotary position embeddings with linear, llama3 and YaRN frequency scaling.

Tables are built once per model (`RotaryEmbedding`); `apply()` rotates q and k in place of the
rotate-half convention transformers uses (the GGUF loader undoes llama.cpp's permutation).
"""

from __future__ import annotations

import math

import torch

from talkloop.engine.config import RopeScaling


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: RopeScaling) -> torch.Tensor:
    # Wavelengths longer than original_ctx / low_freq_factor are slowed by `factor`, shorter
    # than original_ctx / high_freq_factor are kept, and the band between is interpolated.
    old_ctx = scaling.original_max_position_embeddings
    low_wavelen = old_ctx / scaling.low_freq_factor
    high_wavelen = old_ctx / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (old_ctx / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def _yarn_inv_freq(
    base: float, dim: int, scaling: RopeScaling, max_positions: int
) -> tuple[torch.Tensor, float]:
    # YaRN: interpolate low frequencies by `factor`, extrapolate high ones, ramp in between;
    # cos/sin are scaled by the attention factor (0.1 ln(s) + 1 unless given).
    old_ctx = scaling.original_max_position_embeddings or max_positions
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    extrapolation = 1.0 / pos_freqs
    interpolation = 1.0 / (scaling.factor * pos_freqs)

    def correction_dim(num_rotations: float) -> float:
        return (dim * math.log(old_ctx / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low = max(math.floor(correction_dim(scaling.beta_fast)), 0)
    high: float = min(math.ceil(correction_dim(scaling.beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    extrapolation_weight = 1 - ramp
    inv_freq = interpolation * (1 - extrapolation_weight) + extrapolation * extrapolation_weight
    attention_factor = scaling.attention_factor
    if attention_factor is None:
        attention_factor = 0.1 * math.log(scaling.factor) + 1.0 if scaling.factor > 1 else 1.0
    return inv_freq, attention_factor


class RotaryEmbedding:
    """cos/sin tables of shape [max_positions, head_dim // 2] in float32."""

    def __init__(
        self,
        head_dim: int,
        max_positions: int,
        base: float,
        scaling: RopeScaling,
        device: torch.device | str = "cpu",
    ) -> None:
        self.head_dim = head_dim
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
        attention_factor = 1.0
        positions = torch.arange(max_positions, dtype=torch.float64)
        if scaling.type == "linear":
            positions = positions / scaling.factor
        elif scaling.type == "llama3":
            inv_freq = _llama3_inv_freq(inv_freq, scaling)
        elif scaling.type == "yarn":
            inv_freq, attention_factor = _yarn_inv_freq(base, head_dim, scaling, max_positions)
        inv_freq = inv_freq.to(torch.float32).to(torch.float64)  # match float32 inv_freq
        freqs = torch.outer(positions, inv_freq)  # [P, D/2]
        self.cos = (freqs.cos() * attention_factor).to(torch.float32).to(device)
        self.sin = (freqs.sin() * attention_factor).to(torch.float32).to(device)

    def tables(
        self, positions: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin for `positions` [T], each [T, 1, D] (halves repeated), in `dtype`.

        Built once per forward and shared by every layer. The tables follow `positions` to
        their device (a model moved with `.to()` after construction).
        """
        if self.cos.device != positions.device:
            self.cos, self.sin = self.cos.to(positions.device), self.sin.to(positions.device)
        cos = self.cos[positions].repeat(1, 2).unsqueeze(1)
        sin = self.sin[positions].repeat(1, 2).unsqueeze(1)
        return cos.to(dtype), sin.to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [T, heads, D]: x * cos + rotate_half(x) * sin (transformers' convention)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
