"""Engine configuration: one frozen dataclass per concern, validated in `__post_init__`.

`ModelConfig` describes an architecture (read from GGUF metadata or config.json);
`CacheConfig`, `SchedulerConfig` and `EngineConfig` describe how it is served.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

RopeScalingType = Literal["none", "linear", "llama3", "yarn"]
DType = Literal["auto", "float32", "bfloat16"]  # auto: bf16 where computed natively
Quantization = Literal["none", "int8", "int4"]


def torch_device_type(device: str) -> str:
    return device.split(":", 1)[0]


@dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling, as in transformers' `rope_scaling` dict."""

    type: RopeScalingType = "none"
    factor: float = 1.0
    original_max_position_embeddings: int = 0
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    beta_fast: float = 32.0  # yarn
    beta_slow: float = 1.0  # yarn
    attention_factor: float | None = None  # yarn: None means 0.1 * ln(factor) + 1

    def __post_init__(self) -> None:
        if self.type not in ("none", "linear", "llama3", "yarn"):
            raise ValueError(
                f"rope scaling type {self.type!r} is not one of none/linear/llama3/yarn"
            )
        if self.factor <= 0:
            raise ValueError(f"rope scaling factor must be > 0, got {self.factor}")


@dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of a Llama-family (optionally MoE) decoder."""

    architecture: str  # "llama", "qwen2", "mixtral", "qwen2_moe", ...
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # Qwen2: bias on q, k, v projections
    # Mixture of experts (num_experts == 0 means a dense model).
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True  # renormalise the top-k routing weights
    shared_expert_intermediate_size: int = 0  # Qwen2-MoE shared expert (0 = none)
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads"):
            if getattr(self, name) <= 0:
                raise ValueError(f"model config {name} must be > 0, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads != 0:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                f"({self.num_kv_heads})"
            )
        if self.num_experts and not 0 < self.num_experts_per_tok <= self.num_experts:
            raise ValueError(
                f"num_experts_per_tok must be in 1..{self.num_experts}, "
                f"got {self.num_experts_per_tok}"
            )

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0


@dataclass(frozen=True)
class CacheConfig:
    """Paged KV cache: fixed-size blocks preallocated once within a memory budget."""

    block_size: int = 16
    enable_prefix_cache: bool = True
    kv_cache_bytes: int | None = None  # explicit budget; wins over the fraction
    kv_cache_fraction: float = 0.05  # of total system (or device) memory when no bytes given
    min_kv_cache_bytes: int = 64 << 20
    max_kv_cache_bytes: int = 640 << 20  # keeps 32 chats with the bundled model under 2 GB

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if self.kv_cache_bytes is not None and self.kv_cache_bytes <= 0:
            raise ValueError(f"kv_cache_bytes must be > 0, got {self.kv_cache_bytes}")
        if not 0.0 < self.kv_cache_fraction <= 0.9:
            raise ValueError(f"kv_cache_fraction must be in (0, 0.9], got {self.kv_cache_fraction}")


@dataclass(frozen=True)
class SchedulerConfig:
    """Continuous batching limits per step."""

    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512  # per-step token budget (chunked prefill + decodes)
    watermark_fraction: float = 0.01  # free blocks kept when admitting new sequences
    cache_aware_window: int = 8  # waiting requests considered for the longest cached prefix
    max_skips: int = 4  # a request passed over this often is admitted next

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(
                f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}"
            )
        if not 0.0 <= self.watermark_fraction < 0.5:
            raise ValueError(
                f"watermark_fraction must be in [0, 0.5), got {self.watermark_fraction}"
            )


SpeculativeMethod = Literal["none", "ngram", "draft"]


@dataclass(frozen=True)
class SpeculativeConfig:
    """Speculative decoding: who proposes drafts and when it is worth it."""

    method: SpeculativeMethod = "none"
    num_speculative_tokens: int = 4
    max_batch_size: int = 4  # above this many running sequences a step is compute bound
    min_acceptance_rate: float = 0.25  # below it, a sequence pauses speculation for a while
    ngram_max: int = 4
    ngram_min: int = 2
    draft_model: str | None = None  # GGUF file or safetensors folder, for method "draft"

    def __post_init__(self) -> None:
        if self.method not in ("none", "ngram", "draft"):
            raise ValueError(
                f"speculative method must be 'none', 'ngram' or 'draft', got {self.method!r}"
            )
        if self.method == "draft" and not self.draft_model:
            raise ValueError("speculative method 'draft' needs draft_model (a path)")
        if not 1 <= self.num_speculative_tokens <= 16:
            raise ValueError(
                f"num_speculative_tokens must be in 1..16, got {self.num_speculative_tokens}"
            )
        if not 0.0 <= self.min_acceptance_rate <= 1.0:
            raise ValueError(
                f"min_acceptance_rate must be in [0, 1], got {self.min_acceptance_rate}"
            )


@dataclass(frozen=True)
class EngineConfig:
    """What to load and how to run it."""

    model: str | None = None  # GGUF file or safetensors folder; None = the bundled model
    dtype: DType = "float32"
    # Weight-only quantization of the linear layers (int4: group-wise, GGUF Q4_1's form).
    quantization: Quantization = "none"
    device: str = "cpu"
    num_threads: int | None = None  # CPU threads; None = all cores
    max_model_len: int | None = None  # None = the model's context length
    seed: int = 0
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    speculative: SpeculativeConfig = field(default_factory=SpeculativeConfig)

    def __post_init__(self) -> None:
        if self.dtype not in ("auto", "float32", "bfloat16"):
            raise ValueError(f"dtype must be 'auto', 'float32' or 'bfloat16', got {self.dtype!r}")
        if self.quantization not in ("none", "int8", "int4"):
            raise ValueError(
                f"quantization must be 'none', 'int8' or 'int4', got {self.quantization!r}"
            )
        if self.quantization != "none" and torch_device_type(self.device) != "cpu":
            raise ValueError("quantization int8/int4 uses CPU kernels; use device 'cpu'")
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError(f"num_threads must be >= 1, got {self.num_threads}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1, got {self.max_model_len}")
