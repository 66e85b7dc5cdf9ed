"""Process-level torch setup and memory sizing for the engine."""

from __future__ import annotations

import ctypes
import logging
import os

import torch

from talkloop.engine.attention import KVCache
from talkloop.engine.config import EngineConfig, ModelConfig

logger = logging.getLogger(__name__)


def setup_torch(config: EngineConfig) -> None:
    """CPU: flush denormals (a 4x slowdown without it was seen) and set the thread count."""
    if torch.device(config.device).type == "cpu":
        torch.set_flush_denormal(True)
        threads = config.num_threads or os.cpu_count() or 1
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)


def release_free_memory() -> None:
    """Hand freed heap memory back to the OS (glibc only; elsewhere nothing to do).

    Loading dequantizes whole checkpoints through temporary buffers; glibc keeps what they
    freed in the loading thread's arena (a server loads in a worker thread), about 300 MB of
    resident memory that no one uses again.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


def total_memory_bytes(device: str) -> int:
    if torch.device(device).type == "cuda":
        return int(torch.cuda.get_device_properties(torch.device(device)).total_memory)
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def kv_cache_num_blocks(config: EngineConfig, model: ModelConfig, dtype: torch.dtype) -> int:
    """Blocks that fit the KV budget: explicit bytes, else a clamped fraction of memory."""
    cache = config.cache
    budget = cache.kv_cache_bytes
    if budget is None:
        budget = int(total_memory_bytes(config.device) * cache.kv_cache_fraction)
        budget = max(cache.min_kv_cache_bytes, min(cache.max_kv_cache_bytes, budget))
    per_block = KVCache.bytes_per_block(
        model.num_layers, cache.block_size, model.num_kv_heads, model.head_dim, dtype
    )
    num_blocks = budget // per_block
    if num_blocks < 1:
        raise ValueError(f"KV cache budget {budget} bytes is below one block ({per_block} bytes)")
    logger.info(
        "KV cache: %d blocks of %d tokens (%d MiB)",
        num_blocks,
        cache.block_size,
        num_blocks * per_block >> 20,
    )
    return int(num_blocks)
