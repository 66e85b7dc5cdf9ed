from pathlib import Path

import pytest

from talkloop.engine.assets import default_model_path, package_file
from talkloop.engine.errors import ModelLoadError


def test_default_model_is_installed() -> None:
    path = default_model_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.stat().st_size > 90_000_000
    with Path(path).open("rb") as f:
        assert f.read(4) == b"GGUF"


def test_missing_package_names_it() -> None:
    with pytest.raises(ModelLoadError, match="no_such_pkg_talkloop"):
        package_file("no_such_pkg_talkloop", "x.gguf")
