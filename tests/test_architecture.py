"""The import direction of DESIGN.md: lower layers never import higher ones."""

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "talkloop"

# package -> talkloop packages it may import (besides itself)
ALLOWED: dict[str, set[str]] = {
    "engine": set(),
    "characters": set(),
    "memory": {"characters", "backends"},
    "voice": set(),
    "backends": {"engine"},
    "server": {"engine", "characters", "memory", "voice", "backends", "flywheel"},
    "flywheel": {"engine", "backends", "server"},
}


def _imported_talkloop_packages(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: set[str] = set()
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        for name in names:
            parts = name.split(".")
            if parts[0] == "talkloop" and len(parts) > 1:
                found.add(parts[1])
    return found


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_import_direction(package: str) -> None:
    root = SRC / package
    if not root.exists():
        pytest.skip(f"talkloop.{package} does not exist yet")
    for path in root.rglob("*.py"):
        bad = _imported_talkloop_packages(path) - ALLOWED[package] - {package}
        assert not bad, f"{path.relative_to(SRC)} imports talkloop.{sorted(bad)}"


def test_checker_catches_a_bad_import(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("from talkloop.server import app\nimport talkloop.engine.config\n")
    assert _imported_talkloop_packages(bad) == {"server", "engine"}


def test_openmp_workers_spin_briefly_unless_the_environment_says_otherwise() -> None:
    probe = "import os, talkloop; print(os.environ['GOMP_SPINCOUNT'])"
    env = {k: v for k, v in os.environ.items() if k != "GOMP_SPINCOUNT"}
    default = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True)
    assert default.stdout.strip() == "10000", default.stderr
    env["GOMP_SPINCOUNT"] = "250"
    chosen = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True)
    assert chosen.stdout.strip() == "250", chosen.stderr
