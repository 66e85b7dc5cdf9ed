"""Kernel and dtype choices by CPU feature: bf16 only with bf16 dot products, W8A8 only with
int8 dot products (VNNI)."""

from __future__ import annotations

import platform

import pytest
import torch

from talkloop.engine import cpu
from talkloop.engine.config import EngineConfig
from talkloop.engine.loader import load_model


@pytest.mark.parametrize(
    ("flags", "bf16", "int8_dot"),
    [
        ({"avx2", "fma", "f16c"}, False, False),  # Zen 3, Intel client cores before Alder Lake
        ({"avx2", "avx_vnni"}, False, True),  # Alder Lake and later client cores
        ({"avx512f", "avx512_vnni"}, False, True),  # Cascade Lake, Ice Lake
        ({"avx512f", "avx512_vnni", "avx512_bf16"}, True, True),  # Zen 4, Cooper Lake
        ({"amx_bf16", "amx_int8", "amx_tile"}, True, True),  # Sapphire Rapids
        (set(), False, False),  # flags unknown: the portable choices
    ],
)
def test_choices_follow_the_flags(
    monkeypatch: pytest.MonkeyPatch, flags: set[str], bf16: bool, int8_dot: bool
) -> None:
    monkeypatch.setattr(cpu, "cpu_flags", lambda: frozenset(flags))
    assert cpu.has_bf16_compute() is bf16
    assert cpu.has_int8_dot() is int8_dot
    assert cpu.auto_dtype("cpu") == ("bfloat16" if bf16 else "float32")


@pytest.mark.skipif(platform.system() != "Linux", reason="reads /proc/cpuinfo")
def test_flags_are_read_from_this_machine() -> None:
    flags = cpu.cpu_flags()
    assert flags, "no flags line in /proc/cpuinfo"
    assert all(" " not in flag and flag == flag.strip() for flag in flags)
    assert cpu.signature().startswith(platform.machine() + "|")


def test_auto_dtype_loads_the_bundled_model_in_this_cpus_dtype() -> None:
    loaded = load_model(EngineConfig(dtype="auto"))
    expected = torch.bfloat16 if cpu.has_bf16_compute() else torch.float32
    assert loaded.model.embed_tokens.dtype == expected


def test_an_unknown_dtype_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="'auto', 'float32' or 'bfloat16', got 'float16'"):
        EngineConfig(dtype="float16")  # type: ignore[arg-type]
