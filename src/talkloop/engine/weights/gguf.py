"""Load a GGUF file (memory mapped, via `gguf.GGUFReader`) into a `Checkpoint`.

Maps llama.cpp tensor names to canonical Hugging Face names, stacks old per-expert tensors,
and undoes the Q/K row permutation llama.cpp's converter applies to llama-arch models, so the
weights match transformers' rotate-half RoPE. The tokenizer is left in `metadata`, unparsed.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, ReaderField, ReaderTensor

from talkloop.engine.config import ModelConfig
from talkloop.engine.errors import ModelLoadError, UnsupportedModelError
from talkloop.engine.weights.checkpoint import (
    EMBED,
    FINAL_NORM,
    LM_HEAD,
    Checkpoint,
    check_shapes,
    layer_prefix,
)
from talkloop.engine.weights.dequant import QuantizedTensor, quantized_tensor
from talkloop.engine.weights.gguf_config import (
    PERMUTED_QK,
    config_from_gguf,
    gguf_architecture,
    read_metadata,
)

GLOBAL_NAMES = {
    "token_embd.weight": EMBED,
    "output_norm.weight": FINAL_NORM,
    "output.weight": LM_HEAD,
}
LAYER_NAMES = {  # blk.{i}.<key> -> model.layers.{i}.<value>
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "ffn_gate_inp.weight": "mlp.gate.weight",
    "ffn_gate_exps.weight": "mlp.experts.gate_proj",
    "ffn_up_exps.weight": "mlp.experts.up_proj",
    "ffn_down_exps.weight": "mlp.experts.down_proj",
    "ffn_gate_shexp.weight": "mlp.shared_expert.gate_proj.weight",
    "ffn_up_shexp.weight": "mlp.shared_expert.up_proj.weight",
    "ffn_down_shexp.weight": "mlp.shared_expert.down_proj.weight",
    "ffn_gate_inp_shexp.weight": "mlp.shared_expert_gate.weight",
}
_LAYER_RE = re.compile(r"blk\.(\d+)\.(.+)")
_OLD_EXPERT_RE = re.compile(r"ffn_(gate|up|down)\.(\d+)\.weight")  # pre-2024 Mixtral files
ROPE_FREQS = "rope_freqs.weight"


@dataclass(frozen=True, eq=False)
class GGUFContents:
    """A GGUF file's config and still-quantized canonical tensors (Q/K rows already fixed)."""

    config: ModelConfig
    tensors: dict[str, QuantizedTensor]
    source: Path
    metadata: dict[str, Any]


def load_gguf(path: str | Path) -> Checkpoint:
    """Read a GGUF file and dequantize every tensor to float32."""
    contents = read_gguf(path)
    with _one_torch_thread():
        tensors = {name: qt.dequantize() for name, qt in contents.tensors.items()}
    return Checkpoint(contents.config, tensors, contents.source, contents.metadata)


@contextmanager
def _one_torch_thread() -> Iterator[None]:
    """Dequantizing is memory-bound: a second OpenMP thread gains nothing when the CPU is
    quiet and costs 5-50x when it is busy (measured on the 2-core dev machine: 0.2 s vs
    1-20 s for SmolLM2). NOTE: the thread count is process-wide; it is restored after.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def read_gguf(path: str | Path) -> GGUFContents:
    """Read a GGUF file's metadata and map its tensors, without dequantizing them."""
    source = Path(path)
    with _errors_name_the_file(source):
        reader = _open(source)
        metadata = read_metadata(reader)
        raw = {tensor.name: tensor for tensor in reader.tensors}
        shapes = {name: _logical_shape(tensor) for name, tensor in raw.items()}
        rope_freqs = _rope_freqs(raw.get(ROPE_FREQS))
        config = config_from_gguf(metadata, shapes, source, rope_freqs)
        tensors = _canonical_tensors(raw)
        check_shapes(config, {name: qt.shape for name, qt in tensors.items()}, source)
        if gguf_architecture(metadata, source) in PERMUTED_QK:
            _unpermute_qk(tensors, config)
    return GGUFContents(config, tensors, source, metadata)


def read_gguf_metadata(path: str | Path) -> dict[str, Any]:
    """Only a GGUF file's metadata (tokenizer, architecture): no tensor is mapped or checked."""
    source = Path(path)
    with _errors_name_the_file(source):
        return read_metadata(_open(source))


@contextmanager
def _errors_name_the_file(source: Path) -> Iterator[None]:
    """Prefix `source` to load errors raised by helpers that only know a tensor name."""
    try:
        yield
    except ModelLoadError as exc:
        if str(exc).startswith(str(source)):
            raise
        raise type(exc)(f"{source}: {exc}") from exc


class _Reader(GGUFReader):
    """`GGUFReader`, 3x faster, and naming the tensor whose data runs past the end of the file.

    NOTE: both hooks lean on gguf's reader internals; the bundled-model and truncated-file
    tests guard them.
    """

    @property  # type: ignore[override]
    def data(self) -> np.ndarray:
        return self._mapped

    @data.setter
    def data(self, mapped: np.ndarray) -> None:
        # A plain ndarray view of the np.memmap: same pages, but slicing it skips memmap's
        # per-slice bookkeeping, which dominates parsing 100k tokenizer strings.
        self._mapped = mapped.view(np.ndarray)

    def _build_tensors(self, start_offs: int, fields: list[ReaderField]) -> None:
        for field in fields:
            _check_extent(field, start_offs, len(self.data))
        super()._build_tensors(start_offs, fields)


def _check_extent(field: ReaderField, data_start: int, file_bytes: int) -> None:
    _, name_bytes, _, dims, raw_type, offset = field.parts
    name = bytes(name_bytes).decode("utf-8", "replace")
    try:
        qtype = GGMLQuantizationType(int(raw_type[0]))
    except ValueError:
        raise UnsupportedModelError(
            f"tensor {name!r} has unknown GGML type id {int(raw_type[0])}"
        ) from None
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    end = data_start + int(offset[0]) + math.prod(int(d) for d in dims) // block_size * type_size
    if end > file_bytes:
        raise ModelLoadError(
            f"tensor {name!r}: its data ends at byte {end} but the file has only "
            f"{file_bytes} bytes (truncated file?)"
        )


def _open(source: Path) -> GGUFReader:
    if not source.is_file():
        raise ModelLoadError(f"{source}: no such GGUF file")
    try:
        # mode "c": copy-on-write pages, so tensors viewing the file are safely writable.
        reader = _Reader(source, mode="c")
    except (ValueError, KeyError, IndexError, OSError, OverflowError) as exc:
        raise ModelLoadError(
            f"{source}: not a readable GGUF file ({type(exc).__name__}: {exc})"
        ) from exc
    if reader.byte_order != "I":
        raise UnsupportedModelError(f"{source}: big-endian GGUF files are not supported")
    return reader


def _logical_shape(tensor: ReaderTensor) -> tuple[int, ...]:
    return tuple(int(d) for d in reversed(tensor.shape.tolist()))  # ggml lists dims inner first


def _rope_freqs(tensor: ReaderTensor | None) -> torch.Tensor | None:
    if tensor is None:
        return None
    return quantized_tensor(
        tensor.name, tensor.tensor_type, (tensor.n_elements,), tensor.data
    ).dequantize()


def _canonical_tensors(raw: dict[str, ReaderTensor]) -> dict[str, QuantizedTensor]:
    tensors: dict[str, QuantizedTensor] = {}
    experts: dict[str, dict[int, QuantizedTensor]] = {}
    for name, tensor in raw.items():
        if name == ROPE_FREQS:
            continue  # folded into config.rope_scaling
        qt = quantized_tensor(name, tensor.tensor_type, _logical_shape(tensor), tensor.data)
        target, expert = canonical_name(name)
        if expert is None:
            tensors[target] = _as_row(qt) if target.endswith("shared_expert_gate.weight") else qt
        else:
            experts.setdefault(target, {})[expert] = qt
    for target, parts in experts.items():
        tensors[target] = _stack_experts(target, parts)
    return tensors


def canonical_name(gguf_name: str) -> tuple[str, int | None]:
    """Canonical name of a GGUF tensor, and its expert index for old per-expert tensors.

    Unknown names come back unchanged, so the shape check reports them as unsupported.
    """
    if gguf_name in GLOBAL_NAMES:
        return GLOBAL_NAMES[gguf_name], None
    match = _LAYER_RE.fullmatch(gguf_name)
    if match is None:
        return gguf_name, None
    prefix, rest = layer_prefix(int(match[1])), match[2]
    if rest in LAYER_NAMES:
        return prefix + LAYER_NAMES[rest], None
    old = _OLD_EXPERT_RE.fullmatch(rest)
    if old is not None:
        return f"{prefix}mlp.experts.{old[1]}_proj", int(old[2])
    return gguf_name, None


def _as_row(qt: QuantizedTensor) -> QuantizedTensor:
    """[D] → [1, D] (the Qwen2-MoE shared-expert gate); one row either way."""
    return replace(qt, shape=(1, *qt.shape)) if len(qt.shape) == 1 else qt


def _stack_experts(target: str, parts: dict[int, QuantizedTensor]) -> QuantizedTensor:
    """Per-expert [I, D] tensors → one [E, I, D] tensor (raw rows concatenated)."""
    first = parts[min(parts)]
    if sorted(parts) != list(range(len(parts))):
        raise ModelLoadError(f"{first.name}: expert indices {sorted(parts)} are not 0..E-1")
    for qt in parts.values():
        if qt.qtype != first.qtype or qt.shape != first.shape:
            raise UnsupportedModelError(
                f"{qt.name}: experts of {target} differ in type or shape "
                f"({qt.qtype.name} {list(qt.shape)} vs {first.qtype.name} {list(first.shape)})"
            )
    data = torch.cat([parts[index].data for index in range(len(parts))])
    return replace(first, name=target, shape=(len(parts), *first.shape), data=data)


def _unpermute_qk(tensors: dict[str, QuantizedTensor], config: ModelConfig) -> None:
    for layer in range(config.num_layers):
        attn = layer_prefix(layer) + "self_attn."
        for proj, num_heads in (("q_proj", config.num_heads), ("k_proj", config.num_kv_heads)):
            for kind in ("weight", "bias"):
                name = f"{attn}{proj}.{kind}"
                if name in tensors:
                    tensors[name] = unpermute_rows(tensors[name], num_heads)


def unpermute_rows(qt: QuantizedTensor, num_heads: int) -> QuantizedTensor:
    """Undo convert_hf_to_gguf.py's `permute` of Q/K rows, on raw (possibly quantized) rows.

    HF row h*hd + s*(hd/2) + j (head h, half s, pair j) was stored at row h*hd + 2*j + s.
    """
    num_rows = qt.shape[0]
    if len(qt.shape) == 1:
        if GGML_QUANT_SIZES[qt.qtype][0] != 1:
            raise UnsupportedModelError(f"{qt.name}: a quantized 1-D Q/K bias is not supported")
        rows = qt.data.reshape(num_rows, -1)  # one value per row
    else:
        rows = qt.data  # [num_rows, bytes_per_row]
    # [heads, pair j, half s, bytes] -> [heads, half s, pair j, bytes]
    by_head = rows.reshape(num_heads, num_rows // num_heads // 2, 2, rows.shape[-1])
    fixed = by_head.transpose(1, 2).reshape(qt.data.shape)
    return replace(qt, data=fixed)
