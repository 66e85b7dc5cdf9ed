"""Weight loading: GGUF files and safetensors folders into canonical float32 torch tensors.

`load_checkpoint(path)` picks the loader; see `checkpoint.py` for the canonical names. Model
code, tokenizers and chat templates live elsewhere.
"""

from __future__ import annotations

from pathlib import Path

from talkloop.engine.errors import ModelLoadError
from talkloop.engine.weights.checkpoint import Checkpoint, expected_shapes
from talkloop.engine.weights.dequant import QuantizedTensor, dequantize
from talkloop.engine.weights.gguf import GGUFContents, load_gguf, read_gguf
from talkloop.engine.weights.safetensors_folder import (
    load_safetensors_folder,
    save_safetensors_folder,
)

__all__ = [
    "Checkpoint",
    "GGUFContents",
    "QuantizedTensor",
    "dequantize",
    "expected_shapes",
    "load_checkpoint",
    "load_gguf",
    "load_safetensors_folder",
    "read_gguf",
    "save_safetensors_folder",
]


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Load a `.gguf` file or a Hugging Face folder (config.json + safetensors)."""
    source = Path(path)
    if source.is_dir():
        return load_safetensors_folder(source)
    if source.is_file() and source.suffix.lower() == ".gguf":
        return load_gguf(source)
    if not source.exists():
        raise ModelLoadError(f"{source}: no such file or folder")
    raise ModelLoadError(
        f"{source}: expected a .gguf file or a folder with config.json and safetensors weights"
    )
