"""Tiny random checkpoints for the weights tests: canonical tensors and GGUF files.

GGUF files are written the way llama.cpp's convert_hf_to_gguf.py writes them: names from
gguf's own `TensorNameMap`, Q/K rows permuted for llama-arch models, experts stacked.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType, quants

from talkloop.engine.config import ModelConfig
from talkloop.engine.weights.checkpoint import expected_shapes

Q = GGMLQuantizationType

LLAMA = ModelConfig(
    architecture="llama",
    vocab_size=96,
    hidden_size=64,
    intermediate_size=96,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    bos_token_id=1,
    eos_token_ids=(2,),
)
QWEN2 = replace(
    LLAMA,
    architecture="qwen2",
    rms_norm_eps=1e-6,
    rope_theta=1000000.0,
    tie_word_embeddings=True,
    attention_bias=True,
)
MIXTRAL = replace(
    LLAMA,
    architecture="mixtral",
    intermediate_size=32,
    num_experts=4,
    num_experts_per_tok=2,
    moe_intermediate_size=32,
    norm_topk_prob=True,
)
QWEN2_MOE = replace(
    QWEN2,
    architecture="qwen2_moe",
    tie_word_embeddings=False,
    num_experts=4,
    num_experts_per_tok=2,
    moe_intermediate_size=32,
    shared_expert_intermediate_size=64,
    norm_topk_prob=False,
)
GGUF_ARCH = {"llama": "llama", "mixtral": "llama", "qwen2": "qwen2", "qwen2_moe": "qwen2moe"}
_MODEL_ARCH = {
    "llama": gguf.MODEL_ARCH.LLAMA,
    "qwen2": gguf.MODEL_ARCH.QWEN2,
    "qwen2moe": gguf.MODEL_ARCH.QWEN2MOE,
}


def random_tensors(config: ModelConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        name: torch.randn(shape, generator=generator) * 0.2
        for name, shape in expected_shapes(config).items()
    }


def default_qtype(name: str, tensor: torch.Tensor) -> GGMLQuantizationType:
    """A mix like real files: 1-D in F32, quantized Q (to test permuting raw blocks)."""
    if tensor.dim() == 1 or name.endswith(("mlp.gate.weight", "v_proj.weight")):
        return Q.F32
    if name.endswith(("k_proj.weight", "lm_head.weight")):
        return Q.F16
    if name.endswith("up_proj.weight"):
        return Q.Q4_1
    return Q.Q8_0


def hf_permute(weights: torch.Tensor, n_head: int, n_head_kv: int | None) -> torch.Tensor:
    """convert_hf_to_gguf.py's LlamaModel.permute, verbatim in behaviour."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def round_trip(tensor: torch.Tensor, qtype: GGMLQuantizationType) -> torch.Tensor:
    """What a tensor becomes after quantizing to `qtype` and back (gguf's numpy code)."""
    if qtype == Q.F32:
        return tensor.clone()
    if qtype == Q.F16:
        return tensor.half().float()
    packed = quants.quantize(tensor.numpy(), qtype)
    return torch.from_numpy(np.asarray(quants.dequantize(packed, qtype), dtype=np.float32))


def write_gguf(
    path: Path,
    config: ModelConfig,
    tensors: dict[str, torch.Tensor],
    *,
    qtype_of: Callable[[str, torch.Tensor], GGMLQuantizationType] = default_qtype,
    arch: str | None = None,
    metadata: Callable[[gguf.GGUFWriter], None] | None = None,
    per_expert: bool = False,
) -> dict[str, torch.Tensor]:
    """Write `tensors` (canonical, HF layout) as a GGUF file; return what loading must give."""
    arch = arch or GGUF_ARCH[config.architecture]
    writer = gguf.GGUFWriter(path, arch)
    _write_metadata(writer, config)
    if metadata is not None:
        metadata(writer)
    name_map = gguf.get_tensor_name_map(_MODEL_ARCH.get(arch, gguf.MODEL_ARCH.LLAMA), 64)
    expected = {}
    for name, tensor in tensors.items():
        qtype = qtype_of(name, tensor)
        expected[name] = round_trip(tensor, qtype)
        stored = _llama_cpp_layout(name, tensor, config, arch)
        key = name if name.endswith((".weight", ".bias")) else name + ".weight"  # stacked experts
        gguf_name = name_map.get_name(key, try_suffixes=(".weight", ".bias")) or name
        if per_expert and ".experts." in name:
            _add_per_expert(writer, gguf_name, stored, qtype)
        else:
            _add(writer, gguf_name, stored, qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return expected


def _llama_cpp_layout(
    name: str, tensor: torch.Tensor, config: ModelConfig, arch: str
) -> torch.Tensor:
    if arch == "llama" and ".q_proj." in name:
        return hf_permute(tensor, config.num_heads, config.num_heads)
    if arch == "llama" and ".k_proj." in name:
        return hf_permute(tensor, config.num_heads, config.num_kv_heads)
    return tensor


def _add(writer: gguf.GGUFWriter, name: str, tensor: torch.Tensor, qtype: Q) -> None:
    array = tensor.contiguous().numpy()
    if qtype == Q.F32:
        writer.add_tensor(name, array.astype(np.float32))
    elif qtype == Q.F16:
        writer.add_tensor(name, array.astype(np.float16))
    else:
        writer.add_tensor(name, quants.quantize(array, qtype), raw_dtype=qtype)


def _add_per_expert(writer: gguf.GGUFWriter, name: str, tensor: torch.Tensor, qtype: Q) -> None:
    """Pre-2024 Mixtral files: blk.{i}.ffn_gate.{j}.weight, one tensor per expert."""
    base = name.replace("_exps.weight", "")
    for expert in range(tensor.shape[0]):
        _add(writer, f"{base}.{expert}.weight", tensor[expert], qtype)


def _write_metadata(writer: gguf.GGUFWriter, config: ModelConfig) -> None:
    writer.add_block_count(config.num_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_heads)
    writer.add_head_count_kv(config.num_kv_heads)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([f"t{i}" for i in range(config.vocab_size)])
    if config.bos_token_id is not None:
        writer.add_bos_token_id(config.bos_token_id)
    writer.add_eos_token_id(config.eos_token_ids[0])
    if config.is_moe:
        writer.add_expert_count(config.num_experts)
        writer.add_expert_used_count(config.num_experts_per_tok)
    if config.architecture == "qwen2_moe":
        writer.add_expert_feed_forward_length(config.moe_intermediate_size)
        writer.add_expert_shared_feed_forward_length(config.shared_expert_intermediate_size)
