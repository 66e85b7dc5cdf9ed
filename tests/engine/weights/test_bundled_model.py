"""The bundled SmolLM2-135M Q4_1 GGUF: loads fast, with the config DESIGN.md promises."""

import logging
import time

import pytest
import torch

from talkloop.engine.assets import default_model_path
from talkloop.engine.weights import load_checkpoint

logger = logging.getLogger(__name__)


@pytest.mark.integration
def test_bundled_model_loads() -> None:
    start = time.perf_counter()
    checkpoint = load_checkpoint(default_model_path())
    seconds = time.perf_counter() - start
    logger.warning("bundled SmolLM2 GGUF loaded in %.2f s", seconds)  # shown by pytest -rA

    config = checkpoint.config
    assert (config.architecture, config.num_layers, config.hidden_size) == ("llama", 30, 576)
    assert (config.num_heads, config.num_kv_heads, config.head_dim) == (9, 3, 64)
    assert (config.vocab_size, config.intermediate_size) == (49152, 1536)
    assert config.rope_theta == 100000.0
    assert config.tie_word_embeddings
    assert (config.bos_token_id, config.eos_token_ids) == (1, (2,))
    assert "lm_head.weight" not in checkpoint.tensors
    assert checkpoint.tensors["model.embed_tokens.weight"].shape == (49152, 576)
    assert checkpoint.metadata["tokenizer.ggml.tokens"][:3] == [
        "<|endoftext|>",
        "<|im_start|>",
        "<|im_end|>",
    ]
    assert all(t.dtype == torch.float32 for t in checkpoint.tensors.values())
    assert all(torch.isfinite(t).all() for t in checkpoint.tensors.values())


@pytest.mark.integration
def test_bundled_model_matches_transformers_gguf_loader() -> None:
    """transformers' own GGUF reader (numpy dequant + its reverse Q/K permute) agrees bit for bit.

    Slow (about 25 s on 2 cores): transformers parses the tokenizer and builds a model.
    """
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    path = default_model_path()
    hf_config = transformers.AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    model = transformers.AutoModelForCausalLM.from_config(hf_config)
    reference = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)
    expected = reference["tensors"]

    tensors = load_checkpoint(path).tensors
    assert sorted(tensors) == sorted(expected)
    for name, tensor in tensors.items():
        torch.testing.assert_close(tensor, expected[name].float(), rtol=0, atol=0, msg=name)
