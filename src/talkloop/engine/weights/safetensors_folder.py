"""Hugging Face folders (config.json + safetensors, single or sharded) ↔ `Checkpoint`.

Loading stacks per-expert MoE tensors (Mixtral `block_sparse_moe.experts.{j}.w1/w3/w2`,
Qwen2-MoE `mlp.experts.{j}.*_proj`, or transformers 5's fused `gate_up_proj`); saving unstacks
them again so transformers and vLLM load the folder. Tokenizer files are copied, not parsed.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from talkloop.engine.config import ModelConfig
from talkloop.engine.errors import ModelLoadError
from talkloop.engine.weights.checkpoint import LM_HEAD, Checkpoint, check_shapes
from talkloop.engine.weights.hf_config import config_from_hf, hf_config_dict

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_MAX_SHARD_BYTES = 5 * 2**30

# model.layers.{i}.{mlp|block_sparse_moe}.experts.{j}.{proj}.weight
_EXPERT_RE = re.compile(
    r"(model\.layers\.\d+\.)(?:mlp|block_sparse_moe)\.experts\.(\d+)\.(\w+)\.weight"
)
_EXPERT_PROJ = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}  # Mixtral names
_MIXTRAL_PROJ = {canonical: mixtral for mixtral, canonical in _EXPERT_PROJ.items()}
_IGNORED = re.compile(r".*\.rotary_emb\.inv_freq")


def load_safetensors_folder(path: str | Path) -> Checkpoint:
    """Read a Hugging Face model folder into float32 canonical tensors."""
    folder = Path(path)
    hf = _read_json(folder / "config.json", required=True)
    config = config_from_hf(hf, folder, _read_json(folder / "generation_config.json"))
    tensors = canonical_tensors(_read_safetensors(folder), config)
    check_shapes(config, {name: tuple(t.shape) for name, t in tensors.items()}, folder)
    return Checkpoint(config, tensors, folder, metadata=hf)


def _read_json(path: Path, required: bool = False) -> dict[str, Any]:
    if not path.is_file():
        if required:
            raise ModelLoadError(f"{path.parent}: no {path.name}; not a Hugging Face model folder")
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{path}: not readable JSON ({exc})") from exc
    if not isinstance(value, dict):
        raise ModelLoadError(f"{path}: expected a JSON object")
    return value


def _shard_files(folder: Path) -> list[Path]:
    if (folder / SINGLE_FILE).is_file():
        return [folder / SINGLE_FILE]
    if (folder / INDEX_FILE).is_file():
        weight_map = _read_json(folder / INDEX_FILE).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ModelLoadError(f"{folder / INDEX_FILE}: no weight_map object")
        return [folder / name for name in sorted(set(weight_map.values()))]
    raise ModelLoadError(
        f"{folder}: neither {SINGLE_FILE} nor {INDEX_FILE} found "
        f"(only safetensors weights are supported, not pytorch_model.bin)"
    )


def _read_safetensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for shard in _shard_files(folder):
        if not shard.is_file():
            raise ModelLoadError(f"{shard}: shard listed in {INDEX_FILE} is missing")
        try:
            tensors |= load_file(shard)
        except (SafetensorError, OSError, ValueError) as exc:
            raise ModelLoadError(f"{shard}: not a readable safetensors file ({exc})") from exc
    return tensors


def canonical_tensors(hf: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """HF-named tensors → float32 canonical tensors, experts stacked as [E, ...]."""
    tensors: dict[str, torch.Tensor] = {}
    experts: dict[str, dict[int, torch.Tensor]] = {}
    for name, tensor in hf.items():
        if _IGNORED.fullmatch(name) or (name == LM_HEAD and config.tie_word_embeddings):
            continue
        match = _EXPERT_RE.fullmatch(name)
        if match is not None:
            prefix, expert, proj = match[1], int(match[2]), match[3]
            target = f"{prefix}mlp.experts.{_EXPERT_PROJ.get(proj, proj)}"
            experts.setdefault(target, {})[expert] = tensor
        elif name.endswith(".mlp.experts.gate_up_proj"):  # transformers 5: [E, 2I, D]
            gate, up = tensor.float().chunk(2, dim=1)
            tensors[name.replace("gate_up_proj", "gate_proj")] = gate.contiguous()
            tensors[name.replace("gate_up_proj", "up_proj")] = up.contiguous()
        else:
            tensors[name.replace(".block_sparse_moe.", ".mlp.")] = tensor.float()
    for target, parts in experts.items():
        if sorted(parts) != list(range(len(parts))):
            raise ModelLoadError(f"{target}: expert indices {sorted(parts)} are not 0..E-1")
        tensors[target] = torch.stack([parts[j].float() for j in range(len(parts))])
    return tensors


# --- saving ---------------------------------------------------------------------------------


def save_safetensors_folder(
    checkpoint: Checkpoint,
    out_dir: str | Path,
    dtype: str = "bfloat16",
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> Path:
    """Write config.json + safetensors (sharded past `max_shard_bytes`) that transformers loads."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config_json = hf_config_dict(checkpoint.config, dtype)
    shards = _plan_shards(checkpoint, DTYPES[dtype].itemsize, max_shard_bytes)
    _write_shards(checkpoint, shards, out, DTYPES[dtype])
    (out / "config.json").write_text(json.dumps(config_json, indent=2) + "\n", encoding="utf-8")
    _copy_tokenizer(checkpoint.source, out)
    return out


SaveEntry = tuple[str, str, int | None]  # HF name, canonical name, expert index (or None)


def hf_names(tensors: dict[str, torch.Tensor], config: ModelConfig) -> Iterator[SaveEntry]:
    """Every tensor to save: its HF name and where it comes from (experts unstacked)."""
    mixtral = config.architecture == "mixtral"
    for name, tensor in tensors.items():
        if ".mlp.experts." in name:
            prefix, proj = name.split(".mlp.experts.")
            for expert in range(tensor.shape[0]):
                if mixtral:
                    hf = f"{prefix}.block_sparse_moe.experts.{expert}.{_MIXTRAL_PROJ[proj]}.weight"
                else:
                    hf = f"{prefix}.mlp.experts.{expert}.{proj}.weight"
                yield hf, name, expert
        elif mixtral and name.endswith(".mlp.gate.weight"):
            yield name.replace(".mlp.", ".block_sparse_moe."), name, None
        else:
            yield name, name, None


def _plan_shards(
    checkpoint: Checkpoint, itemsize: int, max_shard_bytes: int
) -> list[list[SaveEntry]]:
    shards: list[list[SaveEntry]] = [[]]
    shard_bytes = 0
    for entry in hf_names(checkpoint.tensors, checkpoint.config):
        tensor = checkpoint.tensors[entry[1]]
        num_bytes = (tensor[0] if entry[2] is not None else tensor).numel() * itemsize
        if shards[-1] and shard_bytes + num_bytes > max_shard_bytes:
            shards.append([])
            shard_bytes = 0
        shards[-1].append(entry)
        shard_bytes += num_bytes
    return shards


def _write_shards(
    checkpoint: Checkpoint, shards: list[list[SaveEntry]], out: Path, dtype: torch.dtype
) -> None:
    files = [SINGLE_FILE] if len(shards) == 1 else _shard_names(len(shards))
    weight_map: dict[str, str] = {}
    total_bytes = 0
    for file, shard in zip(files, shards, strict=True):
        data = {}
        for hf, name, expert in shard:
            tensor = checkpoint.tensors[name]
            tensor = tensor[expert] if expert is not None else tensor
            # copy=True: unstacked experts must not share storage (safetensors refuses that)
            data[hf] = tensor.to(dtype=dtype, copy=True).contiguous()
            weight_map[hf] = file
            total_bytes += data[hf].numel() * data[hf].element_size()
        save_file(data, out / file, metadata={"format": "pt"})
    if len(shards) > 1:
        index = {"metadata": {"total_size": total_bytes}, "weight_map": weight_map}
        (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")


def _shard_names(count: int) -> list[str]:
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def _copy_tokenizer(source: Path, out: Path) -> None:
    if not source.is_dir() or source.resolve() == out.resolve():
        return
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, out / name)
