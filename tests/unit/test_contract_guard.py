"""The contract guard: buf breaking against the committed baseline fails on incompatible changes."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BUF = ROOT / "scripts" / "node_modules" / ".bin" / "buf"

pytestmark = pytest.mark.skipif(shutil.which("npm") is None, reason="buf is installed with npm, which is missing here")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the proto workspace (scripts/buf installs buf and the google imports first)."""
    subprocess.run(
        [ROOT / "scripts" / "buf", "--version"],
        check=True,
        capture_output=True,
        env={**os.environ, "PYTHON": sys.executable},
    )
    copy = tmp_path_factory.mktemp("workspace")
    for part in ("buf.yaml", "protos", "plugins/examples/protos", ".buf-deps"):
        source = ROOT / part
        target = copy / part
        if source.is_dir():
            shutil.copytree(source, target)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(source, target)
    return copy


def breaking(workspace: Path) -> subprocess.CompletedProcess[str]:
    baseline = ROOT / "scripts" / "proto-baseline" / "ajs.binpb"
    return subprocess.run(
        [BUF, "breaking", "protos", "--against", baseline], cwd=workspace, capture_output=True, text=True
    )


def edit(workspace: Path, old: str, new: str) -> None:
    proto = workspace / "protos" / "ajs" / "v1" / "job_service.proto"
    text = proto.read_text()
    assert old in text
    proto.write_text(text.replace(old, new))


def test_the_committed_contract_matches_its_baseline(workspace: Path) -> None:
    result = breaking(workspace)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    ("old", "new", "says"),
    [
        ("string parent_id = 2;", "string parent = 2;", 'changed name from "parent_id" to "parent"'),
        ("int32 priority = 8;", "int32 priority = 18;", 'field "8" with name "priority"'),
        ("REQUEST_STATE_FAILED = 4;", "REQUEST_STATE_FAILED = 7;", 'enum value "4"'),
    ],
)
def test_renaming_or_renumbering_fails(workspace: Path, old: str, new: str, says: str) -> None:
    edit(workspace, old, new)
    try:
        result = breaking(workspace)
    finally:
        edit(workspace, new, old)
    assert result.returncode != 0
    assert says.lower() in result.stdout.lower()


def test_adding_a_field_passes(workspace: Path) -> None:
    edit(workspace, "  int32 priority = 8;", "  int32 priority = 8;\n  // A new field.\n  string note = 99;")
    try:
        result = breaking(workspace)
    finally:
        edit(workspace, "  int32 priority = 8;\n  // A new field.\n  string note = 99;", "  int32 priority = 8;")
    assert result.returncode == 0, result.stdout
