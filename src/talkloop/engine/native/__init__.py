"""Native CPU kernels, built on first use with the machine's C++ compiler, with a fallback.

`paged_attention.cpp` is compiled against the installed torch (ATen's `parallel_for` runs on
torch's own OpenMP runtime: torch ships `libgomp.so.1`, which the loader shares) into a
shared library cached under `$TALKLOOP_CACHE_DIR` (default `~/.cache/talkloop/kernels`), keyed
by the source, torch's version, the compiler, its flags and the CPU, and called through
ctypes (which releases the GIL). Without a compiler, or with `TALKLOOP_NATIVE_KERNELS=0`, the
engine uses its PyTorch path: same results, slower batched decoding.
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
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("paged_attention.cpp")
ABI_VERSION = 2
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
        str(SOURCE),
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
                    SOURCE.read_bytes(),
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
