"""What this machine's CPU computes natively, read once from its feature flags.

Kernel choices that depend on the instruction set and not only on speed measured elsewhere:
- bf16 compute pays only where the CPU has bf16 dot products (AVX-512 BF16, AMX). Elsewhere
  torch converts every operand: on a 2-core AVX2 EPYC (Zen 3) a dense bf16 prefill ran at
  71 tok/s against 395 in float32. So `dtype="auto"` picks bf16 only with them.
- int8 x int8 GEMMs (`torch._int_mm`, the W8A8 path) pay only with VNNI (AVX-512 VNNI,
  AVX-VNNI, AMX): on that AVX2 EPYC a 128-row prefill through it ran at 17 tok/s, its time
  all in `_int_mm`.
"""

from __future__ import annotations

import functools
import platform
from pathlib import Path

import torch

from talkloop.engine.config import torch_device_type

BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})
INT8_DOT_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (`flags` on x86, `Features` on ARM; empty where unknown)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return frozenset(line.partition(":")[2].split())
    except OSError:
        pass
    return frozenset()


def signature() -> str:
    """What `-march=native` code depends on: the architecture and the CPU's flags."""
    flags = " ".join(sorted(cpu_flags())) or platform.processor()
    return f"{platform.machine()}|{flags}"


def has_bf16_compute() -> bool:
    return bool(cpu_flags() & BF16_FLAGS)


def has_int8_dot() -> bool:
    return bool(cpu_flags() & INT8_DOT_FLAGS)


def auto_dtype(device: str) -> str:
    """`dtype="auto"`: bf16 where the device computes it natively, else float32."""
    kind = torch_device_type(device)
    if kind == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
    if kind == "cpu":
        return "bfloat16" if has_bf16_compute() else "float32"
    return "float32"
