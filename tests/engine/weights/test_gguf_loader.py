"""load_gguf on tiny GGUF files written like llama.cpp's converter writes them."""

import math
import re
from dataclasses import replace
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from talkloop.engine.config import ModelConfig, RopeScaling
from talkloop.engine.errors import ModelLoadError, UnsupportedModelError
from talkloop.engine.weights.gguf import load_gguf, read_gguf

from .builders import LLAMA, MIXTRAL, QWEN2, QWEN2_MOE, Q, random_tensors, write_gguf


def _assert_same_tensors(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(expected)
    for name, tensor in expected.items():
        assert got[name].dtype == torch.float32, name
        torch.testing.assert_close(got[name], tensor, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("config", [LLAMA, QWEN2, MIXTRAL, QWEN2_MOE], ids=lambda c: c.architecture)
def test_loads_hf_layout_tensors_and_config(tmp_path: Path, config: ModelConfig) -> None:
    path = tmp_path / "tiny.gguf"
    expected = write_gguf(path, config, random_tensors(config))

    checkpoint = load_gguf(path)

    assert checkpoint.config == config
    assert checkpoint.source == path
    assert checkpoint.metadata["general.architecture"] in ("llama", "qwen2", "qwen2moe")
    assert checkpoint.metadata["tokenizer.ggml.tokens"][:2] == ["t0", "t1"]
    _assert_same_tensors(checkpoint.tensors, expected)


def test_permuted_q_is_really_undone(tmp_path: Path) -> None:
    # guards the test itself: the stored Q rows differ from HF's, the loaded ones do not
    path = tmp_path / "tiny.gguf"
    tensors = random_tensors(LLAMA)
    write_gguf(path, LLAMA, tensors, qtype_of=lambda name, t: Q.F32)
    reader = gguf.GGUFReader(path)
    stored = next(t for t in reader.tensors if t.name == "blk.0.attn_q.weight")
    hf_q = tensors["model.layers.0.self_attn.q_proj.weight"]
    assert not np.array_equal(np.asarray(stored.data), hf_q.numpy())
    torch.testing.assert_close(
        load_gguf(path).tensors["model.layers.0.self_attn.q_proj.weight"], hf_q, rtol=0, atol=0
    )


def test_old_per_expert_mixtral_tensors_are_stacked(tmp_path: Path) -> None:
    path = tmp_path / "old.gguf"
    expected = write_gguf(path, MIXTRAL, random_tensors(MIXTRAL), per_expert=True)
    checkpoint = load_gguf(path)
    assert checkpoint.tensors["model.layers.1.mlp.experts.down_proj"].shape == (4, 64, 32)
    _assert_same_tensors(checkpoint.tensors, expected)


def test_read_gguf_keeps_blocks_quantized(tmp_path: Path) -> None:
    path = tmp_path / "tiny.gguf"
    expected = write_gguf(path, LLAMA, random_tensors(LLAMA))
    q_proj = read_gguf(path).tensors["model.layers.0.self_attn.q_proj.weight"]
    assert q_proj.qtype == Q.Q8_0
    assert q_proj.data.shape == (64, 2 * 34)
    name = "model.layers.0.self_attn.q_proj.weight"
    torch.testing.assert_close(q_proj.dequantize(), expected[name], rtol=0, atol=0)


def _llama3_factors(head_dim: int, base: float, factor: float, old_context_len: int) -> list[float]:
    """convert_hf_to_gguf.py's LlamaModel rope_freqs loop (low=1, high=4)."""
    low_freq_factor, high_freq_factor = 1.0, 4.0
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    freqs = 1.0 / (base ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_freq_wavelen:
            factors.append(1.0)
        elif wavelen > low_freq_wavelen:
            factors.append(factor)
        else:
            smooth = (old_context_len / wavelen - low_freq_factor) / (
                high_freq_factor - low_freq_factor
            )
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return factors


def _write_with_rope_freqs(path: Path, factors: np.ndarray) -> None:
    config = replace(LLAMA, head_dim=32, num_heads=2, num_kv_heads=1, rope_theta=500000.0)

    def add_rope_freqs(writer: gguf.GGUFWriter) -> None:
        writer.add_tensor("rope_freqs.weight", factors)

    write_gguf(path, config, random_tensors(config), metadata=add_rope_freqs)


def test_llama3_rope_scaling_is_recovered_from_rope_freqs(tmp_path: Path) -> None:
    path = tmp_path / "llama3.gguf"
    _write_with_rope_freqs(path, np.array(_llama3_factors(32, 500000.0, 8.0, 8192), np.float32))
    rope = load_gguf(path).config.rope_scaling
    assert rope == RopeScaling("llama3", 8.0, 8192, low_freq_factor=1.0, high_freq_factor=4.0)


def test_other_rope_freqs_are_unsupported(tmp_path: Path) -> None:
    path = tmp_path / "odd.gguf"
    _write_with_rope_freqs(path, np.linspace(1, 3, 16, dtype=np.float32))
    with pytest.raises(
        UnsupportedModelError, match=r"odd\.gguf: rope_freqs\.weight does not match"
    ):
        load_gguf(path)


def test_yarn_and_linear_rope_scaling_metadata(tmp_path: Path) -> None:
    def yarn(writer: gguf.GGUFWriter) -> None:
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(4.0)
        writer.add_rope_scaling_orig_ctx_len(32768)

    path = tmp_path / "yarn.gguf"
    write_gguf(path, QWEN2, random_tensors(QWEN2), metadata=yarn)
    assert load_gguf(path).config.rope_scaling == RopeScaling("yarn", 4.0, 32768)

    def linear(writer: gguf.GGUFWriter) -> None:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(2.0)

    path = tmp_path / "linear.gguf"
    write_gguf(path, LLAMA, random_tensors(LLAMA), metadata=linear)
    assert load_gguf(path).config.rope_scaling == RopeScaling("linear", 2.0)


# --- bad input ------------------------------------------------------------------------------


@pytest.fixture
def llama_file(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.gguf"
    write_gguf(path, LLAMA, random_tensors(LLAMA))
    return path


def test_truncated_data_names_the_file_and_a_tensor(llama_file: Path) -> None:
    data = llama_file.read_bytes()
    llama_file.write_bytes(data[: len(data) - 1000])
    with pytest.raises(
        ModelLoadError, match=rf"{re.escape(str(llama_file))}: tensor '[\w.]+'.*truncated"
    ):
        load_gguf(llama_file)


def test_truncated_header_names_the_file(llama_file: Path) -> None:
    llama_file.write_bytes(llama_file.read_bytes()[:300])
    with pytest.raises(
        ModelLoadError, match=rf"{re.escape(str(llama_file))}: not a readable GGUF file"
    ):
        load_gguf(llama_file)


def test_garbage_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "garbage.gguf"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(
        ModelLoadError, match=rf"{re.escape(str(path))}: not a readable GGUF file.*magic"
    ):
        load_gguf(path)


def test_empty_and_missing_files(tmp_path: Path) -> None:
    (tmp_path / "empty.gguf").touch()
    with pytest.raises(ModelLoadError, match=r"empty\.gguf"):
        load_gguf(tmp_path / "empty.gguf")
    with pytest.raises(ModelLoadError, match="no such GGUF file"):
        load_gguf(tmp_path / "absent.gguf")


def test_missing_tensor_is_named(tmp_path: Path) -> None:
    tensors = random_tensors(LLAMA)
    del tensors["model.layers.1.mlp.down_proj.weight"]
    path = tmp_path / "tiny.gguf"
    write_gguf(path, LLAMA, tensors)
    with pytest.raises(ModelLoadError, match=r"missing tensor model\.layers\.1\.mlp\.down_proj"):
        load_gguf(path)


def test_wrong_shape_is_named(tmp_path: Path) -> None:
    path = tmp_path / "tiny.gguf"
    tensors = random_tensors(LLAMA)
    tensors["model.norm.weight"] = torch.ones(32)
    write_gguf(path, LLAMA, tensors)
    with pytest.raises(
        ModelLoadError, match=r"model\.norm\.weight has shape \[32\], expected \[64\]"
    ):
        load_gguf(path)


def test_unknown_architecture_is_named(tmp_path: Path) -> None:
    path = tmp_path / "gpt2.gguf"
    write_gguf(path, LLAMA, random_tensors(LLAMA), arch="gpt2")
    with pytest.raises(UnsupportedModelError, match=r"general.architecture is 'gpt2'"):
        load_gguf(path)


def test_unknown_tensor_is_unsupported(tmp_path: Path) -> None:
    def add_q_norm(writer: gguf.GGUFWriter) -> None:
        writer.add_tensor("blk.0.attn_q_norm.weight", np.ones(16, dtype=np.float32))

    path = tmp_path / "qknorm.gguf"
    write_gguf(path, LLAMA, random_tensors(LLAMA), metadata=add_q_norm)
    with pytest.raises(UnsupportedModelError, match=r"blk\.0\.attn_q_norm\.weight"):
        load_gguf(path)


def test_unsupported_quant_type_is_named(tmp_path: Path) -> None:
    def add_q2k(writer: gguf.GGUFWriter) -> None:
        writer.add_tensor("blk.0.extra.weight", np.zeros((1, 84), np.uint8), raw_dtype=Q.Q2_K)

    path = tmp_path / "q2k.gguf"
    write_gguf(path, LLAMA, random_tensors(LLAMA), metadata=add_q2k)
    with pytest.raises(
        UnsupportedModelError, match=r"q2k\.gguf: tensor 'blk\.0\.extra\.weight'.*Q2_K"
    ):
        load_gguf(path)


def test_missing_metadata_key_is_named(tmp_path: Path) -> None:
    path = tmp_path / "tiny.gguf"
    write_gguf(path, LLAMA, random_tensors(LLAMA), arch="llama")
    reader_free = path.read_bytes().replace(b"llama.block_count", b"llama.blokk_count")
    path.write_bytes(reader_free)
    with pytest.raises(ModelLoadError, match=r"llama\.block_count is missing"):
        load_gguf(path)


def test_load_checkpoint_dispatches_gguf_files(llama_file: Path) -> None:
    from talkloop.engine.weights import load_checkpoint

    checkpoint = load_checkpoint(llama_file)
    assert checkpoint.config == LLAMA
    assert checkpoint.source == llama_file
