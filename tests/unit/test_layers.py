"""The layer contract (pyproject [tool.importlinter]) holds, and fails on a planted violation."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import ajs_grpc

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = Path(ajs_grpc.__file__).parent
LAYERS = "Layers point down: faces > edge > engine > connectors > core"
NO_GRPC = "Nothing below the gRPC edge imports grpc or the generated code"


def lint_imports(source_root: Path) -> subprocess.CompletedProcess[str]:
    """Runs import-linter with the project's contracts on the package found under ``source_root``."""
    return subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())",
            "--config",
            str(ROOT / "pyproject.toml"),
            "--no-cache",
        ],
        cwd=source_root,
        env={**os.environ, "PYTHONPATH": str(source_root)},
        capture_output=True,
        text=True,
        timeout=300,
    )


def copy_package(tmp_path: Path) -> Path:
    shutil.copytree(PACKAGE, tmp_path / "ajs_grpc", ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path / "ajs_grpc"


def test_the_package_keeps_its_layers(tmp_path: Path) -> None:
    copy_package(tmp_path)
    result = lint_imports(tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{LAYERS} KEPT" in result.stdout
    assert f"{NO_GRPC} KEPT" in result.stdout


def test_a_lower_layer_importing_a_higher_one_or_grpc_breaks_the_contract(tmp_path: Path) -> None:
    package = copy_package(tmp_path)
    (package / "engine" / "planted.py").write_text("from ajs_grpc.edge import convert  # engine -> edge\n")
    (package / "core" / "planted.py").write_text("import grpc  # gRPC below the edge\n")
    result = lint_imports(tmp_path)
    assert result.returncode != 0
    assert f"{LAYERS} BROKEN" in result.stdout
    assert f"{NO_GRPC} BROKEN" in result.stdout
    assert "ajs_grpc.engine.planted -> ajs_grpc.edge.convert" in result.stdout
    assert "ajs_grpc.core.planted -> grpc" in result.stdout
