"""Native CPU kernels, built on first use with the machine's C++ compiler, with a fallback.

`paged_attention.cpp` (decode attention on the paged cache), `int8_linear.cpp` (the passes
around an int8 GEMM) and `rms_norm.cpp` are compiled against the installed torch (ATen's
`parallel_for` runs on torch's own OpenMP runtime: torch ships `libgomp.so.1`, which the loader
shares) into a shared library cached under `$TALKLOOP_CACHE_DIR` (default
`~/.cache/talkloop/kernels`), keyed by the sources, torch's version, the compiler, its flags
and the CPU, and called through ctypes (which releases the GIL). Without a compiler, or with
`TALKLOOP_NATIVE_KERNELS=0`, the engine uses its PyTorch path: same results, slower decoding
and prefill.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

SOURCES = tuple(
    Path(__file__).with_name(name)
    for name in ("paged_attention.cpp", "int8_linear.cpp", "rms_norm.cpp")
)
HEADERS = (Path(__file__).with_name("scalar.h"),)  # part of the cache key, not compiled alone
ABI_VERSION = 3
BUILD_TIMEOUT_S = 300
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17")
ENABLE_ENV = "TALKLOOP_NATIVE_KERNELS"


class NativeBuildError(RuntimeError):
    """The kernels could not be built or loaded (the PyTorch path is used instead)."""


def cache_dir() -> Path:
    explicit = os.environ.get("TALKLOOP_CACHE_DIR")
    if explicit:
        return Path(explicit) / "kernels"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "talkloop" / "kernels"


def _cpu_signature() -> str:
    """What `-march=native` depends on: the machine and its CPU flags."""
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags = line
                break
    except OSError:
        flags = platform.processor()
    return f"{platform.machine()}|{flags}"


def _compiler() -> str:
    for candidate in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if candidate and shutil.which(candidate):
            return candidate
    raise NativeBuildError("no C++ compiler found (set CXX, or install g++ or clang++)")


def _build(compiler: str, target: Path) -> None:
    torch_dir = Path(torch.__file__).parent
    command = [
        compiler,
        *FLAGS,
        f"-I{torch_dir / 'include'}",
        *(str(source) for source in SOURCES),
        f"-L{torch_dir / 'lib'}",
        "-ltorch_cpu",
        "-lc10",
        f"-Wl,-rpath,{torch_dir / 'lib'}",
    ]
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target, then rename: concurrent builders never load half a file.
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        partial = Path(scratch) / target.name
        done = subprocess.run(
            [*command, "-o", str(partial)],
            capture_output=True,
            text=True,
            timeout=BUILD_TIMEOUT_S,
            check=False,
        )
        if done.returncode != 0:
            raise NativeBuildError(f"{compiler} failed: {done.stderr.strip()[-2000:]}")
        os.replace(partial, target)


def _declare(lib: ctypes.CDLL) -> None:
    pointers = [ctypes.c_void_p] * 7
    sizes = [ctypes.c_int64] * 7
    for name in (
        "talkloop_decode_attention_f32",
        "talkloop_decode_attention_bf16",
        "talkloop_decode_attention_lse_f32",
        "talkloop_decode_attention_lse_bf16",
    ):
        function = getattr(lib, name)
        function.argtypes = [*pointers, *sizes, ctypes.c_float]
        function.restype = None
    pointer, size = ctypes.c_void_p, ctypes.c_int64
    for name in ("talkloop_quantize_rows_f32", "talkloop_quantize_rows_bf16"):
        function = getattr(lib, name)
        function.argtypes = [pointer, size, size, pointer, pointer, size, pointer, pointer, pointer]
        function.restype = None
    for name in ("talkloop_dequantize_f32", "talkloop_dequantize_bf16"):
        function = getattr(lib, name)
        function.argtypes = [pointer, size, size, *[pointer] * 5, size, pointer]
        function.restype = None
    for name in ("talkloop_rms_norm_f32", "talkloop_rms_norm_bf16"):
        function = getattr(lib, name)
        function.argtypes = [pointer, pointer, size, size, ctypes.c_float, pointer]
        function.restype = None
    lib.talkloop_abi_version.restype = ctypes.c_int
    lib.talkloop_max_head_dim.restype = ctypes.c_int64


@functools.cache
def library() -> ctypes.CDLL | None:
    """The kernels, built once per machine; None when they cannot be (logged once)."""
    if os.environ.get(ENABLE_ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    try:
        compiler = _compiler()
        key = hashlib.sha256(
            b"\0".join(
                [
                    *(source.read_bytes() for source in (*SOURCES, *HEADERS)),
                    torch.__version__.encode(),
                    compiler.encode(),
                    " ".join(FLAGS).encode(),
                    _cpu_signature().encode(),
                ]
            )
        ).hexdigest()[:20]
        target = cache_dir() / f"talkloop_kernels-{key}.so"
        if not target.exists():
            logger.info("building native kernels with %s (once per machine)", compiler)
            _build(compiler, target)
        lib = ctypes.CDLL(str(target))
        _declare(lib)
        if lib.talkloop_abi_version() != ABI_VERSION:
            raise NativeBuildError(f"stale kernel library {target}")
        return lib
    except (OSError, subprocess.SubprocessError, NativeBuildError) as exc:
        logger.warning("native kernels unavailable, using the PyTorch path: %s", exc)
        return None


_DTYPES = {torch.float32: "f32", torch.bfloat16: "bf16"}


def decode_attention_supported(device: torch.device, dtype: torch.dtype, head_dim: int) -> bool:
    """Whether `decode_attention` serves this cache (else use the PyTorch path)."""
    if device.type != "cpu" or dtype not in _DTYPES:
        return False
    lib = library()
    return lib is not None and head_dim <= lib.talkloop_max_head_dim()


def decode_attention(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """q [B, H, D] against each row's blocks of the [Hkv, blocks, block_size, D] caches."""
    out = torch.empty(q.shape, dtype=q.dtype)
    _call("", out, None, q, key_cache, value_cache, block_tables, context_lens, scale)
    return out


def decode_attention_lse(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """As `decode_attention`, in float32, with each row and head's log-sum-exp [B, H]."""
    out = torch.empty(q.shape, dtype=torch.float32)
    lse = torch.empty(q.shape[:2], dtype=torch.float32)
    _call("lse_", out, lse, q, key_cache, value_cache, block_tables, context_lens, scale)
    return out, lse


def _call(
    variant: str,
    out: torch.Tensor,
    lse: torch.Tensor | None,
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> None:
    lib = library()
    assert lib is not None, "check decode_attention_supported() first"
    q = q.contiguous()
    tables = block_tables.contiguous()
    lens = context_lens.contiguous()
    batch, num_heads, head_dim = q.shape
    num_kv_heads, num_blocks, block_size, _ = key_cache.shape
    function = getattr(lib, f"talkloop_decode_attention_{variant}{_DTYPES[q.dtype]}")
    function(
        out.data_ptr(),
        lse.data_ptr() if lse is not None else None,
        q.data_ptr(),
        key_cache.data_ptr(),
        value_cache.data_ptr(),
        tables.data_ptr(),
        lens.data_ptr(),
        batch,
        num_kv_heads,
        num_heads // num_kv_heads,
        head_dim,
        num_blocks,
        block_size,
        tables.shape[1],
        scale,
    )


@dataclass(frozen=True)
class OutlierChannels:
    """Input channels a W8A8 layer keeps in float32: their indices, a 0/1 keep mask over all
    channels, and the matching weight columns, transposed: [len(indices), out_features]."""

    indices: torch.Tensor  # int64 [k]
    keep: torch.Tensor  # uint8 [in_features]
    weight: torch.Tensor  # float32 [k, out_features]

    @classmethod
    def of(cls, weight: torch.Tensor, indices: torch.Tensor) -> OutlierChannels:
        indices = indices.to(torch.int64).sort().values.contiguous()
        keep = torch.ones(weight.shape[1], dtype=torch.uint8)
        keep[indices] = 0
        return cls(indices, keep, weight.float()[:, indices].t().contiguous())


def quantize_rows(
    x: torch.Tensor, outliers: OutlierChannels | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Symmetric per-row int8 quantization of a [rows, cols] float32/bf16 CPU tensor:
    (q int8, scales float32 [rows], outlier values float32 [rows, k] or None), with
    x ~= q * scales[:, None] (round half to even) on every column but the outliers', which
    are 0 in q and excluded from the scales."""
    lib = library()
    if lib is None or x.dtype not in _DTYPES or x.device.type != "cpu":
        xf = x.float()
        kept = xf if outliers is None else xf * outliers.keep
        amax = kept.abs().amax(dim=-1)
        inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
        q = (kept * inv[:, None]).clamp_(-127, 127).round_().to(torch.int8)
        values = xf[:, outliers.indices] if outliers is not None else None
        return q, amax / 127.0, values
    x = x.contiguous()
    rows, cols = x.shape
    q = torch.empty((rows, cols), dtype=torch.int8)
    scales = torch.empty(rows, dtype=torch.float32)
    count = 0 if outliers is None else len(outliers.indices)
    values = torch.empty((rows, count), dtype=torch.float32) if outliers is not None else None
    getattr(lib, f"talkloop_quantize_rows_{_DTYPES[x.dtype]}")(
        x.data_ptr(),
        rows,
        cols,
        outliers.keep.data_ptr() if outliers is not None else None,
        outliers.indices.data_ptr() if outliers is not None else None,
        count,
        values.data_ptr() if values is not None else None,
        q.data_ptr(),
        scales.data_ptr(),
    )
    return q, scales, values


def dequantize(
    acc: torch.Tensor,
    row_scales: torch.Tensor,
    col_scales: torch.Tensor,
    bias: torch.Tensor | None,
    dtype: torch.dtype,
    outliers: OutlierChannels | None = None,
    outlier_values: torch.Tensor | None = None,
) -> torch.Tensor:
    """int32 [rows, cols] accumulators * row_scales[:, None] * col_scales[None, :]
    + outlier_values @ outliers.weight (+ bias), as `dtype` (float32 or bf16)."""
    lib = library()
    if lib is None or dtype not in _DTYPES or acc.device.type != "cpu":
        y = acc.float() * row_scales[:, None] * col_scales[None, :]
        if outliers is not None and outlier_values is not None:
            y += outlier_values @ outliers.weight
        if bias is not None:
            y += bias.float()
        return y.to(dtype)
    # Keep every converted tensor referenced until the call returns (its memory is passed).
    acc = acc.contiguous()
    row_scales = row_scales.float().contiguous()
    col_scales = col_scales.float().contiguous()
    bias = bias.to(dtype).contiguous() if bias is not None else None
    rows, cols = acc.shape
    out = torch.empty((rows, cols), dtype=dtype)
    has_outliers = outliers is not None and outlier_values is not None
    getattr(lib, f"talkloop_dequantize_{_DTYPES[dtype]}")(
        acc.data_ptr(),
        rows,
        cols,
        row_scales.data_ptr(),
        col_scales.data_ptr(),
        bias.data_ptr() if bias is not None else None,
        outlier_values.data_ptr() if has_outliers else None,  # type: ignore[union-attr]
        outliers.weight.data_ptr() if has_outliers else None,  # type: ignore[union-attr]
        len(outliers.indices) if has_outliers else 0,  # type: ignore[union-attr]
        out.data_ptr(),
    )
    return out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor | None:
    """RMSNorm of a contiguous CPU [..., D] float32/bf16 tensor (weight of its dtype), or None
    when the kernels cannot serve it (the caller's PyTorch path runs): also when autograd
    must see it (draft training), since the kernel has no backward."""
    lib = library()
    if (
        lib is None
        or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
        or x.dtype not in _DTYPES
        or weight.dtype != x.dtype
        or x.device.type != "cpu"
        or not x.is_contiguous()
    ):
        return None
    cols = x.shape[-1]
    out = torch.empty_like(x)
    weight = weight.contiguous()
    getattr(lib, f"talkloop_rms_norm_{_DTYPES[x.dtype]}")(
        x.data_ptr(), weight.data_ptr(), x.numel() // cols, cols, eps, out.data_ptr()
    )
    return out
