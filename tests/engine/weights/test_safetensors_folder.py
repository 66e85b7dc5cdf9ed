"""Hugging Face folders: load what transformers saved; save what transformers loads."""

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from talkloop.engine.config import ModelConfig, RopeScaling
from talkloop.engine.errors import ModelLoadError, UnsupportedModelError
from talkloop.engine.weights import (
    load_checkpoint,
    load_safetensors_folder,
    save_safetensors_folder,
)
from talkloop.engine.weights.gguf import load_gguf

from .builders import LLAMA, MIXTRAL, QWEN2, QWEN2_MOE, random_tensors, write_gguf
from .hf_models import canonical_state, hf_config, logits, random_model

CONFIGS = [LLAMA, QWEN2, MIXTRAL, QWEN2_MOE]


def _ids(config: ModelConfig) -> str:
    return config.architecture


@pytest.mark.parametrize("expected", CONFIGS, ids=_ids)
def test_loads_transformers_save_pretrained(tmp_path: Path, expected: ModelConfig) -> None:
    model = random_model(hf_config(expected.architecture))
    model.save_pretrained(tmp_path / "hf")

    checkpoint = load_safetensors_folder(tmp_path / "hf")

    assert checkpoint.config == expected
    assert checkpoint.metadata["model_type"] == expected.architecture
    state = canonical_state(model)
    assert sorted(checkpoint.tensors) == sorted(state)
    for name, tensor in state.items():
        torch.testing.assert_close(checkpoint.tensors[name], tensor, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("expected", CONFIGS, ids=_ids)
def test_saved_folder_gives_transformers_identical_logits(
    tmp_path: Path, expected: ModelConfig
) -> None:
    model = random_model(hf_config(expected.architecture))
    model.save_pretrained(tmp_path / "hf")
    checkpoint = load_safetensors_folder(tmp_path / "hf")

    save_safetensors_folder(checkpoint, tmp_path / "out", dtype="float32")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)

    torch.testing.assert_close(logits(reloaded.eval()), logits(model), rtol=0, atol=0)
    assert load_safetensors_folder(tmp_path / "out").config == expected


@pytest.mark.parametrize("config", CONFIGS, ids=_ids)
def test_gguf_checkpoint_converts_to_a_transformers_folder(
    tmp_path: Path, config: ModelConfig
) -> None:
    expected = write_gguf(tmp_path / "tiny.gguf", config, random_tensors(config))
    save_safetensors_folder(load_gguf(tmp_path / "tiny.gguf"), tmp_path / "out", "float32")

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)

    state = canonical_state(reloaded)
    assert sorted(state) == sorted(expected)
    for name, tensor in expected.items():
        torch.testing.assert_close(state[name], tensor, rtol=0, atol=0, msg=name)


def test_sharded_bfloat16_round_trip_and_tokenizer_copy(tmp_path: Path) -> None:
    model = random_model(hf_config("mixtral"))
    model.save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "tokenizer.json").write_text('{"model": {}}')
    checkpoint = load_safetensors_folder(tmp_path / "hf")

    save_safetensors_folder(checkpoint, tmp_path / "out", "bfloat16", max_shard_bytes=20_000)

    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert "model.layers.0.block_sparse_moe.experts.3.w2.weight" in index["weight_map"]
    assert (tmp_path / "out" / "tokenizer.json").read_text() == '{"model": {}}'
    reloaded = load_checkpoint(tmp_path / "out")
    assert reloaded.config == checkpoint.config
    for name, tensor in checkpoint.tensors.items():
        expected = tensor.to(torch.bfloat16).float()
        torch.testing.assert_close(reloaded.tensors[name], expected, rtol=0, atol=0, msg=name)


def test_rope_scaling_round_trips_through_config_json(tmp_path: Path) -> None:
    llama3 = {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 128,
    }
    model = random_model(hf_config("llama", rope_parameters=llama3))
    model.save_pretrained(tmp_path / "hf")
    checkpoint = load_safetensors_folder(tmp_path / "hf")
    assert checkpoint.config.rope_theta == 500000.0
    assert checkpoint.config.rope_scaling == RopeScaling("llama3", 8.0, 128, 1.0, 4.0)

    save_safetensors_folder(checkpoint, tmp_path / "out", dtype="float32")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    assert reloaded.config.rope_parameters["rope_type"] == "llama3"
    torch.testing.assert_close(logits(reloaded.eval()), logits(model), rtol=0, atol=0)


def _write_config(folder: Path, **config: object) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    ("rope_scaling", "expected"),
    [
        ({"type": "linear", "factor": 2.0}, RopeScaling("linear", 2.0)),
        (
            {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768},
            RopeScaling("yarn", 4.0, 32768),
        ),
    ],
)
def test_transformers4_rope_scaling(
    tmp_path: Path, rope_scaling: dict[str, object], expected: RopeScaling
) -> None:
    model = random_model(hf_config("qwen2"))
    model.save_pretrained(tmp_path)
    hf = json.loads((tmp_path / "config.json").read_text())
    del hf["rope_parameters"]
    _write_config(tmp_path, **hf, rope_theta=1000000.0, rope_scaling=rope_scaling)
    assert load_safetensors_folder(tmp_path).config.rope_scaling == expected


# --- bad input ------------------------------------------------------------------------------


def test_folder_without_config_json(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"no config\.json"):
        load_safetensors_folder(tmp_path)


def test_unsupported_model_type_is_named(tmp_path: Path) -> None:
    _write_config(tmp_path, model_type="gpt2")
    with pytest.raises(UnsupportedModelError, match="model_type is 'gpt2'"):
        load_checkpoint(tmp_path)


def test_missing_weights_file_is_named(tmp_path: Path) -> None:
    random_model(hf_config("llama")).config.to_json_file(tmp_path / "config.json")
    with pytest.raises(ModelLoadError, match=r"neither model\.safetensors nor"):
        load_safetensors_folder(tmp_path)


def test_corrupt_safetensors_is_named(tmp_path: Path) -> None:
    random_model(hf_config("llama")).save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(ModelLoadError, match=r"model\.safetensors: not a readable safetensors"):
        load_safetensors_folder(tmp_path)


def test_missing_tensor_is_named(tmp_path: Path) -> None:
    model = random_model(hf_config("llama"))
    model.save_pretrained(tmp_path)
    hf = json.loads((tmp_path / "config.json").read_text())
    _write_config(tmp_path, **{**hf, "num_hidden_layers": 3})
    with pytest.raises(ModelLoadError, match=r"missing tensor model\.layers\.2\."):
        load_safetensors_folder(tmp_path)


def test_load_checkpoint_rejects_other_paths(tmp_path: Path) -> None:
    (tmp_path / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(ModelLoadError, match=r"expected a \.gguf file or a folder"):
        load_checkpoint(tmp_path / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="no such file or folder"):
        load_checkpoint(tmp_path / "absent")
