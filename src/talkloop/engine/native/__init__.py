"""Native CPU kernels, built on first use with the machine's C++ compiler, with a fallback.

`paged_attention.cpp` (decode attention on the paged cache), `int8_linear.cpp` (the passes
around an int8 GEMM), `int4_linear.cpp` (an int4 x int8 kernel, AVX-512 VNNI or AVX2),
`rms_norm.cpp`, `decode_step.cpp` (a whole decode step of a dense Llama-family model in one
call), `prefill_attention.cpp` (causal prefill attention in bf16 on the paged cache) and
`argmax.cpp` (greedy picks) are compiled against the installed torch (ATen's `parallel_for`
runs on torch's own OpenMP runtime: torch ships `libgomp.so.1`, which the loader
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
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from talkloop.engine import cpu

logger = logging.getLogger(__name__)

SOURCES = tuple(
    Path(__file__).with_name(name)
    for name in (
        "paged_attention.cpp",
        "int8_linear.cpp",
        "int4_linear.cpp",
        "rms_norm.cpp",
        "decode_step.cpp",
        "prefill_attention.cpp",
        "argmax.cpp",
    )
)
# Part of the cache key, not compiled alone.
HEADERS = tuple(Path(__file__).with_name(name) for name in ("scalar.h", "simd.h"))
ABI_VERSION = 7
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
    for name in ("talkloop_int4_linear_f32", "talkloop_int4_linear_bf16"):
        function = getattr(lib, name)
        function.argtypes = [pointer, size, size, pointer, size, pointer, pointer]
        function.restype = None
    lib.talkloop_int4_supported.restype = ctypes.c_int
    floats = [ctypes.c_float] * 2
    lib.talkloop_decode_plan_create.argtypes = [pointer] * 3 + floats + [pointer, size]
    lib.talkloop_decode_plan_create.restype = ctypes.c_void_p
    lib.talkloop_decode_plan_free.argtypes = [pointer]
    lib.talkloop_decode_plan_free.restype = None
    lib.talkloop_decode_step.argtypes = [pointer, pointer, pointer, size, *[pointer] * 3, size]
    lib.talkloop_decode_step.argtypes += [pointer, pointer, size]
    lib.talkloop_decode_step.restype = ctypes.c_int
    lib.talkloop_prefill_attention_supported.argtypes = [size]
    lib.talkloop_prefill_attention_supported.restype = ctypes.c_int
    lib.talkloop_prefill_attention_bf16.argtypes = [pointer, pointer, size, pointer, pointer]
    lib.talkloop_prefill_attention_bf16.argtypes += [pointer, *[size] * 7, ctypes.c_float]
    lib.talkloop_prefill_attention_bf16.restype = None
    lib.talkloop_argmax_rows_f32.argtypes = [pointer, size, size, size, pointer]
    lib.talkloop_argmax_rows_f32.restype = None
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
                    cpu.signature().encode(),
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


def prefill_attention_supported(device: torch.device, dtype: torch.dtype, head_dim: int) -> bool:
    """Whether `prefill_attention` serves this cache: bf16 on a CPU with AVX-512 BF16."""
    if device.type != "cpu" or dtype != torch.bfloat16:
        return False
    lib = library()
    return lib is not None and bool(lib.talkloop_prefill_attention_supported(head_dim))


def prefill_attention(
    out: torch.Tensor,
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_table: torch.Tensor,
    context_len: int,
    scale: float,
) -> None:
    """Causal attention of a chunk's n new queries q [n, H, D] (the last n of `context_len`
    positions; rows may be strided, heads must be dense) over its blocks of the
    [Hkv, blocks, block_size, D] caches, written into out [n, H, D] (contiguous). All bf16."""
    lib = library()
    assert lib is not None, "check prefill_attention_supported() first"
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads, num_blocks, block_size, _ = key_cache.shape
    tensors = (out, q, key_cache, value_cache)
    if any(t.dtype != torch.bfloat16 or t.device.type != "cpu" for t in tensors):
        raise ValueError("prefill attention takes bfloat16 CPU tensors (q, caches, out)")
    if q.stride(2) != 1 or q.stride(1) != head_dim:
        q = q.contiguous()
    if not (out.is_contiguous() and key_cache.is_contiguous() and value_cache.is_contiguous()):
        raise ValueError("prefill attention needs contiguous caches and output")
    if not 0 < num_tokens <= context_len <= block_table.numel() * block_size:
        raise ValueError(
            f"{num_tokens} new tokens of a {context_len}-token context do not fit "
            f"{block_table.numel()} blocks of {block_size}"
        )
    table = block_table.to(torch.int64).contiguous()
    lib.talkloop_prefill_attention_bf16(
        out.data_ptr(),
        q.data_ptr(),
        q.stride(0),
        key_cache.data_ptr(),
        value_cache.data_ptr(),
        table.data_ptr(),
        num_tokens,
        context_len,
        num_kv_heads,
        num_heads // num_kv_heads,
        head_dim,
        num_blocks,
        block_size,
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


def argmax_rows(logits: torch.Tensor) -> torch.Tensor:
    """`logits.argmax(dim=-1)` of a CPU float32 [N, V] tensor with unit column stride (the
    same picks, NaN and ties included), natively when the kernels are built."""
    lib = library()
    if (
        lib is None
        or logits.dim() != 2
        or logits.dtype != torch.float32
        or logits.device.type != "cpu"
        or logits.stride(1) != 1
        or logits.shape[1] == 0
    ):
        return logits.argmax(dim=-1)
    out = torch.empty(logits.shape[0], dtype=torch.int64)
    lib.talkloop_argmax_rows_f32(
        logits.data_ptr(), logits.shape[0], logits.shape[1], logits.stride(0), out.data_ptr()
    )
    return out


# ---- int4 linears (int4_linear.cpp) ----------------------------------------------------------
INT4_GROUP = 32  # input channels per scale and min
INT4_TILE = 16  # output channels per packed tile


def int4_supported() -> bool:
    """Whether the native int4 kernel is built here (it needs AVX-512 VNNI or AVX2)."""
    lib = library()
    return lib is not None and bool(lib.talkloop_int4_supported())


def int4_quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group-wise asymmetric uint4 of a float [N, K] weight (GGUF Q4_1's form):
    (q uint8 [N, K] in 0..15, scale and min fp16 [N, K / 32]), w ~= q * scale + min."""
    out_features, in_features = weight.shape
    groups = weight.float().view(out_features, in_features // INT4_GROUP, INT4_GROUP)
    low, high = groups.amin(dim=-1), groups.amax(dim=-1)
    scale = ((high - low) / 15.0).to(torch.float16)
    low16 = low.to(torch.float16)
    divisor = torch.where(scale > 0, scale.float(), torch.ones_like(low))
    q = ((groups - low16.float()[..., None]) / divisor[..., None]).round_().clamp_(0, 15)
    return q.to(torch.uint8).view(out_features, in_features), scale, low16


def int4_pack(q: torch.Tensor, scale: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
    """`int4_quantize`'s output in int4_linear.cpp's layout: uint8 [N / 16, K / 32, 320]."""
    out_features, in_features = q.shape
    tiles, groups = out_features // INT4_TILE, in_features // INT4_GROUP
    # q[16 t + n][32 g + 8 c + 4 h + j] -> [t, g, c, n, j, h]; nibble h = 0 low, 1 high.
    split = q.view(tiles, INT4_TILE, groups, 4, 2, 4).permute(0, 2, 3, 1, 5, 4)
    weights = (split[..., 0] | (split[..., 1] << 4)).reshape(tiles, groups, 256)

    def per_tile(values: torch.Tensor) -> torch.Tensor:  # fp16 [N, G] -> bytes [t, g, 32]
        tiled = values.view(tiles, INT4_TILE, groups).permute(0, 2, 1).contiguous()
        return tiled.view(torch.uint8).view(tiles, groups, 2 * INT4_TILE)

    return torch.cat([weights, per_tile(scale), per_tile(low)], dim=-1).contiguous()


def int4_linear(
    x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """x [..., K] (float32 or bf16, CPU) times the packed int4 weight [N, K], transposed
    (+ bias): [..., N] in x's dtype. Activations are quantized per group of 32 to int8."""
    lib = library()
    assert lib is not None and int4_supported(), "check int4_supported() first"
    flat = x.reshape(-1, x.shape[-1]).contiguous()
    out_features = packed.shape[0] * INT4_TILE
    out = torch.empty((flat.shape[0], out_features), dtype=x.dtype)
    if not flat.shape[0]:  # no rows (a step that samples nothing): nothing to compute
        return out.view(*x.shape[:-1], out_features)
    bias = bias.to(x.dtype).contiguous() if bias is not None else None
    getattr(lib, f"talkloop_int4_linear_{_DTYPES[x.dtype]}")(
        flat.data_ptr(),
        flat.shape[0],
        flat.shape[1],
        packed.data_ptr(),
        out_features,
        bias.data_ptr() if bias is not None else None,
        out.data_ptr(),
    )
    return out.view(*x.shape[:-1], out_features)


# ---- whole decode steps (decode_step.cpp) ---------------------------------------------------
_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.int8: 2, torch.uint8: 3}
_ERROR_CAPACITY = 512


# decode_step.cpp's LinearKind
LINEAR_DENSE = 0  # `F.linear` on the dense `weight`
LINEAR_INT8 = 8  # `_weight_int8pack_mm` on `weight` and `scales`
LINEAR_INT4_TORCH = 4  # `_weight_int4pack_mm_for_cpu` on `weight`, `scales`, `group_size`
LINEAR_INT4_NATIVE = 5  # `int4_linear` on its packed `weight`


@dataclass(frozen=True)
class LinearWeights:
    """One linear layer as the native step runs it: a `LINEAR_*` kind, its tensors, and
    `bias` added in the activations' dtype."""

    kind: int
    weight: torch.Tensor
    scales: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    group_size: int = 0


@dataclass(frozen=True)
class DecoderWeights:
    """One Llama-family decoder layer (dense feed-forward) and its KV pools."""

    input_norm: torch.Tensor
    post_attn_norm: torch.Tensor
    qkv: LinearWeights
    o_proj: LinearWeights
    gate_up: LinearWeights
    down: LinearWeights
    key_cache: torch.Tensor  # [Hkv, num_blocks, block_size, D]
    value_cache: torch.Tensor


class DecodePlan:
    """A decode step of the whole model in one native call: embedding, every layer (the same
    linear kernels as the modules, with RMSNorm, RoPE, the cache write, paged decode attention
    and the elementwise ops done natively between them) and the final norm.

    Rows are independent tokens (own position, slot, block table and context length): a batch
    of single-token decodes, or a sequence's speculative rows. The plan keeps every tensor it
    reads referenced; weights must not be replaced while it is in use (in-place updates are
    seen)."""

    def __init__(
        self,
        *,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        intermediate_size: int,
        eps: float,
        scale: float,
        embed: torch.Tensor,
        rope_cos: torch.Tensor,
        rope_sin: torch.Tensor,
        final_norm: torch.Tensor,
        layers: list[DecoderWeights],
        max_rows: int,
    ) -> None:
        lib = library()
        if lib is None:
            raise NativeBuildError("native kernels unavailable")
        self._lib = lib
        self.max_rows = max_rows
        self.dtype = embed.dtype
        self.hidden = embed.shape[1]
        key_cache = layers[0].key_cache
        self._keep: list[torch.Tensor] = []  # everything whose memory the plan points at
        tensors = [final_norm, embed, rope_cos, rope_sin]
        header = [self.hidden, num_heads, num_kv_heads, head_dim]
        header += [intermediate_size, _CODES[self.dtype], len(layers)]
        header += [key_cache.shape[1], key_cache.shape[2]]
        header += [word for t in tensors for word in self._describe(t)]
        words: list[int] = []
        caches: list[int] = []
        for layer in layers:
            words += self._describe(layer.input_norm) + self._describe(layer.post_attn_norm)
            for linear in (layer.qkv, layer.o_proj, layer.gate_up, layer.down):
                words += [linear.kind, linear.group_size]
                for t in (linear.weight, linear.scales, linear.bias):
                    words += self._describe(t)
            for cache in (layer.key_cache, layer.value_cache):
                if not cache.is_contiguous() or cache.dtype != self.dtype:
                    raise ValueError("KV pools must be contiguous, in the activations' dtype")
                self._keep.append(cache)
                caches.append(cache.data_ptr())
        self._error = ctypes.create_string_buffer(_ERROR_CAPACITY)
        handle = lib.talkloop_decode_plan_create(
            (ctypes.c_int64 * len(header))(*header),
            (ctypes.c_int64 * len(words))(*words),
            (ctypes.c_void_p * len(caches))(*caches),
            eps,
            scale,
            self._error,
            _ERROR_CAPACITY,
        )
        if not handle:
            raise ValueError(f"native decode plan refused: {self._error.value.decode()}")
        self._handle: ctypes.c_void_p | None = ctypes.c_void_p(handle)

    def _describe(self, t: torch.Tensor | None) -> list[int]:
        """The 6 words decode_step.cpp reads a tensor from (all zero for None)."""
        if t is None:
            return [0] * 6
        if t.dtype not in _CODES or not 1 <= t.dim() <= 3 or t.device.type != "cpu":
            raise ValueError(f"cannot pass a {t.dtype} tensor of shape {tuple(t.shape)}")
        t = t.detach().contiguous()
        self._keep.append(t)
        return [t.data_ptr(), _CODES[t.dtype], t.dim(), *t.shape, *[0] * (3 - t.dim())]

    def step(
        self,
        token_ids: torch.Tensor,
        positions: torch.Tensor,
        slots: torch.Tensor,
        block_tables: torch.Tensor,
        context_lens: torch.Tensor,
    ) -> torch.Tensor:
        """int64 token_ids, positions, slots, context_lens [R] and block_tables [R, blocks]
        -> hidden states [R, hidden] after the final norm (keys and values written)."""
        rows = token_ids.shape[0]
        if not 0 < rows <= self.max_rows:
            raise ValueError(f"a native decode step takes 1..{self.max_rows} rows, got {rows}")
        args = [t.contiguous() for t in (token_ids, positions, slots, block_tables, context_lens)]
        if any(t.dtype != torch.int64 for t in args):
            raise ValueError("token ids, positions, slots, tables and lengths must be int64")
        token_ids, positions, slots, block_tables, context_lens = args
        out = torch.empty((rows, self.hidden), dtype=self.dtype)
        status = self._lib.talkloop_decode_step(
            self._handle,
            token_ids.data_ptr(),
            positions.data_ptr(),
            rows,
            slots.data_ptr(),
            block_tables.data_ptr(),
            context_lens.data_ptr(),
            block_tables.shape[1],
            out.data_ptr(),
            self._error,
            _ERROR_CAPACITY,
        )
        if status != 0:
            raise ValueError(f"native decode step failed: {self._error.value.decode()}")
        return out

    def __del__(self) -> None:
        handle = getattr(self, "_handle", None)
        if handle:
            self._lib.talkloop_decode_plan_free(handle)
            self._handle = None
