"""Shared fixtures. Nothing here reaches the network: tiny models come from configs, and the tiny
zoo teacher is trained by the project's own `zoo train` code into a temporary folder."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from deploykit.zoo import get_entry

REPO = Path(__file__).resolve().parents[1]

# the test-size zoo teacher's architecture, with random weights
TINY_UNET = get_entry("digits-tiny").unet_config

TINY_RECIPE = """\
name: tiny
teacher: zoo:digits-tiny
seed: 0
stages:
  - stage: prune
    criterion: magnitude
    macs_target: 0.5
    round_to: 4
  - stage: distill
    steps: {distill_steps}
    batch_size: 16
    checkpoint_every: 5
  - stage: export
  - stage: bench
    batch_size: 8
    warmup: 1
    runs: 5
  - stage: eval
    num_samples: 32
    steps: 4
    grid_samples: 8
"""


@pytest.fixture
def tiny_unet():
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    return UNet2DModel(**TINY_UNET).eval()


@pytest.fixture(scope="session")
def zoo_dir(tmp_path_factory) -> Path:
    """The test-size zoo teacher, trained by `deploykit zoo train` (a few seconds)."""
    folder = tmp_path_factory.mktemp("zoo")
    env = {**os.environ, "DEPLOYKIT_ZOO_DIR": str(folder)}
    subprocess.run([sys.executable, "-m", "deploykit.cli", "zoo", "train", "digits-tiny"], env=env, check=True,
                   capture_output=True)
    return folder


@pytest.fixture(scope="session")
def shapes_zoo_dir(tmp_path_factory) -> Path:
    """The test-size text-to-image zoo teacher (zoo:shapes-tiny), trained by `deploykit zoo train` (seconds)."""
    folder = tmp_path_factory.mktemp("zoo-shapes")
    env = {**os.environ, "DEPLOYKIT_ZOO_DIR": str(folder)}
    subprocess.run([sys.executable, "-m", "deploykit.cli", "zoo", "train", "shapes-tiny"], env=env, check=True,
                   capture_output=True, timeout=600)
    return folder


@pytest.fixture
def zoo_env(zoo_dir, monkeypatch) -> dict:
    monkeypatch.setenv("DEPLOYKIT_ZOO_DIR", str(zoo_dir))
    return {**os.environ, "DEPLOYKIT_ZOO_DIR": str(zoo_dir)}


def run_cli(*args: str, env: dict | None = None, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "deploykit.cli", *args], env=env or os.environ.copy(),
                          capture_output=True, text=True, timeout=timeout, cwd=REPO)


def write_tiny_recipe(folder: Path, distill_steps: int = 20) -> Path:
    path = folder / "tiny.yaml"
    path.write_text(TINY_RECIPE.format(distill_steps=distill_steps))
    return path


@pytest.fixture(scope="session")
def built_artifact(tmp_path_factory, zoo_dir) -> tuple[Path, Path, dict]:
    """One end-to-end build of the tiny recipe, shared by the tests that read its outputs."""
    folder = tmp_path_factory.mktemp("build")
    recipe = write_tiny_recipe(folder)
    env = {**os.environ, "DEPLOYKIT_ZOO_DIR": str(zoo_dir)}
    result = run_cli("build", str(recipe), "--out", str(folder / "out"), env=env)
    assert result.returncode == 0, result.stderr
    return folder / "out", recipe, env


# Serving: the smallest artifacts that have everything the runtime loads (model/, onnx/, the stage cache).
SERVE_ZOO_RECIPE = """\
name: serve-zoo
teacher: zoo:digits
seed: 0
stages:
  - stage: prune
    macs_target: 0.5
  - stage: export
    check_batch: 2
"""

SERVE_SD_RECIPE = """\
name: serve-sd
teacher: random:tiny-sd
resolution: 32
seed: 0
stages:
  - stage: prune
    macs_target: 0.5
    round_to: 4
  - stage: export
    check_batch: 2
"""


def _build_quietly(folder: Path, recipe_text: str) -> Path:
    from rich.console import Console

    from deploykit.recipe import load_recipe
    from deploykit.runner import build

    recipe = folder / "recipe.yaml"
    recipe.write_text(recipe_text)
    build(load_recipe(recipe), recipe, folder / "out", Console(stderr=True, quiet=True))
    return folder / "out"


@pytest.fixture(scope="session")
def zoo_serve_artifact(tmp_path_factory) -> Path:
    """The shipped zoo:digits teacher, pruned and exported (about 25 s on 2 cores)."""
    return _build_quietly(tmp_path_factory.mktemp("serve-zoo"), SERVE_ZOO_RECIPE)


@pytest.fixture(scope="session")
def sd_serve_artifact(tmp_path_factory) -> Path:
    """A tiny random-weights SD pipeline, pruned and exported whole (about a minute on 2 cores)."""
    return _build_quietly(tmp_path_factory.mktemp("serve-sd"), SERVE_SD_RECIPE)


@pytest.fixture(scope="session")
def zoo_pipeline(zoo_serve_artifact):
    from deploykit.runtime import Pipeline

    return Pipeline.from_artifact(zoo_serve_artifact)


@pytest.fixture(scope="session")
def sd_pipeline(sd_serve_artifact):
    from deploykit.runtime import Pipeline

    return Pipeline.from_artifact(sd_serve_artifact)
