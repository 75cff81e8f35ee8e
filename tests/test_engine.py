"""The engine stage: TensorRT-free logic here; the build itself where `tensorrt` imports; mypy against tensorrt-stubs."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from deploykit.engines.tensorrt import (
    builder_flag_names,
    engine_name,
    precision_flags,
    sparse_layer_lines,
    sparse_summary,
    tensorrt_missing,
)
from deploykit.errors import InputError
from deploykit.models.io_spec import unet_io
from tests.conftest import REPO, run_cli

SD_UNET = {"in_channels": 4, "out_channels": 4, "sample_size": 64, "cross_attention_dim": 768}

BUILD_LOG = """\
[I] [TRT] Loaded engine size: 12 MiB
[V] [TRT] (Sparsity) Layers eligible for sparse math: /down_blocks.0/resnets.0/conv1/Conv, /mid_block/attentions.0/proj_in/MatMul
[V] [TRT] (Sparsity) TRT inference plan picked sparse implementation for layers: /down_blocks.0/resnets.0/conv1/Conv
[V] [TRT] Tactic: 0x0000000000000001 Time: 0.01
"""


def test_engine_names_carry_gpu_trt_version_and_precision():
    assert engine_name("NVIDIA H100 80GB HBM3", "10.13.0.35", "fp16") == "nvidia-h100-80gb-hbm3_trt10.13.0.35_fp16.engine"
    assert engine_name("Orin (nvgpu)", "10.3.0", "int8", sparse=True) == "orin-nvgpu_trt10.3.0_int8-sparse.engine"


def test_profiles_come_from_the_unets_description():
    shapes = unet_io(SD_UNET, scalar_timestep=True).input_profile((1, 2, 4), (32, 64, 64))
    assert shapes["sample"] == ((1, 4, 32, 32), (2, 4, 64, 64), (4, 4, 64, 64))
    assert shapes["timestep"] == ((), (), ())  # optimum's scalar timestep
    assert shapes["encoder_hidden_states"] == ((1, 77, 768), (2, 77, 768), (4, 77, 768))
    assert unet_io(SD_UNET).input_profile((1, 2, 4), (8, 8, 8))["timestep"] == ((1,), (2,), (4,))


def test_profile_ranges_are_checked():
    with pytest.raises(InputError, match="min <= opt <= max"):
        unet_io(SD_UNET).input_profile((2, 1, 4), (64, 64, 64))


def test_sparse_layer_lines_and_summary():
    lines = sparse_layer_lines(BUILD_LOG.splitlines())
    assert len(lines) == 2
    summary = sparse_summary(lines)
    assert summary["eligible"] == ["/down_blocks.0/resnets.0/conv1/Conv", "/mid_block/attentions.0/proj_in/MatMul"]
    assert summary["picked"] == ["/down_blocks.0/resnets.0/conv1/Conv"]


def test_builder_flags_by_precision():
    assert builder_flag_names(True, False, False) == ["FP16"]
    assert builder_flag_names(True, True, True) == ["FP16", "INT8", "SPARSE_WEIGHTS"]
    assert builder_flag_names(True, True, True, strongly_typed=True) == ["SPARSE_WEIGHTS"]
    assert precision_flags("fp16", has_qdq=False) == (True, False)
    assert precision_flags("best", has_qdq=False) == (True, False)
    assert precision_flags("best", has_qdq=True) == (True, True)
    with pytest.raises(InputError, match="QDQ"):
        precision_flags("int8", has_qdq=False)


def test_stage_profile_defaults_follow_the_build():
    from deploykit.stages.engine import EngineStage, shape_ranges

    sd = {"kind": "sd", "sample_shape": [4, 64, 64], "resolution": 512, "vae_scale_factor": 8}
    assert shape_ranges(EngineStage(), sd) == ((1, 2, 2), (64, 64, 64))
    assert shape_ranges(EngineStage(batch=(1, 2, 8), resolution=(256, 512, 768)), sd) == ((1, 2, 8), (32, 64, 96))
    with pytest.raises(InputError, match="not a multiple of 8"):
        shape_ranges(EngineStage(resolution=(256, 500, 768)), sd)
    pixel = {"kind": "pixel", "sample_shape": [1, 16, 16]}
    assert shape_ranges(EngineStage(), pixel) == ((1, 32, 32), (16, 16, 16))


@pytest.mark.parametrize("body, expected", [
    ("target: cpu\nstages:\n  - stage: prune\n  - stage: export\n  - stage: engine\n", "run on target cuda"),
    ("target: cuda\nstages:\n  - stage: prune\n  - stage: engine\n", "add an export stage"),
    ("target: cuda\nstages:\n  - stage: prune\n  - stage: export\n  - stage: engine\n    batch: [4, 2, 8]\n", "min <= opt <= max"),
    ("target: cuda\nstages:\n  - stage: prune\n  - stage: verify\n  - stage: export\n", "order"),
])
def test_engine_recipes_are_checked(tmp_path, body, expected):
    from deploykit.recipe import load_recipe

    path = tmp_path / "r.yaml"
    path.write_text("name: t\nteacher: zoo:digits-tiny\n" + body)
    with pytest.raises(InputError, match=expected):
        load_recipe(path)


def test_without_tensorrt_the_build_stops_before_writing(tmp_path, zoo_env):
    reason = tensorrt_missing()
    if reason is None:
        pytest.skip("tensorrt imports here: the missing-TensorRT path cannot be tested")
    recipe = tmp_path / "trt.yaml"
    recipe.write_text("name: trt\nteacher: zoo:digits-tiny\ntarget: cuda\nstages:\n  - stage: prune\n    round_to: 4\n"
                      "  - stage: export\n  - stage: engine\n")
    result = run_cli("build", str(recipe), "--out", str(tmp_path / "out"), env=zoo_env)
    assert result.returncode == 2, result.stderr
    assert "engine stage builds TensorRT engines" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_tensorrt_engine_end_to_end(tmp_path, tiny_unet):
    """Where TensorRT and a GPU exist: a tiny UNet's engine, fp16 with sparse weights, a timing cache and a log."""
    # (not pytest.importorskip: with tensorrt-stubs installed, `import tensorrt` finds the stubs' bare folder)
    reason = tensorrt_missing()
    if reason is not None:
        pytest.skip(f"{reason} -- this test runs where TensorRT works")
    import torch

    if not torch.cuda.is_available():
        pytest.skip("tensorrt imports but there is no CUDA device")
    from deploykit.engines.tensorrt import build_engine, gpu_name
    from deploykit.export import export_unet
    from deploykit.models.inputs import example_unet_inputs

    onnx_path = export_unet(tiny_unet, tmp_path / "onnx" / "model.onnx", example_unet_inputs(tiny_unet, 2))
    import tensorrt as trt

    path = tmp_path / "engines" / engine_name(gpu_name(), trt.__version__, "fp16", sparse=True)
    built = build_engine(onnx_path, path, fp16=True, int8=False, sparse_weights=True,
                         profiles=unet_io(tiny_unet).input_profile((1, 2, 4), (16, 16, 16)),
                         timing_cache=tmp_path / "timing.cache", workspace_gb=1, log_path=tmp_path / "build.log")
    assert path.is_file() and path.stat().st_size > 0
    assert (tmp_path / "timing.cache").is_file() and (tmp_path / "build.log").read_text()
    assert built.flags == ["FP16", "SPARSE_WEIGHTS"] and built.profiles["sample"][1] == [2, 1, 16, 16]


# ----------------------------------------------------------------------------------------------
# mypy against tensorrt-stubs

MYPY_CONFIG = """\
[mypy]
python_version = 3.10
follow_imports = skip
warn_unused_ignores = True
[mypy-tensorrt,tensorrt_bindings,tensorrt_bindings.*]
follow_imports = normal
ignore_errors = True
[mypy-tensorrt_libs,polygraphy.*,onnxruntime,onnxruntime.*]
ignore_missing_imports = True
"""
TYPED = ["deploykit/engines/tensorrt.py", "deploykit/stages/engine.py", "deploykit/stages/verify.py",
         "deploykit/device/scripts/run.py", "deploykit/device/scripts/build_engines.py"]


def patched_stubs(dest: Path) -> Path:
    """A copy of the installed tensorrt-stubs that mypy can parse.

    tensorrt-stubs 10.13.0.35.1 installs ``tensorrt/__init__.pyi`` and ``tensorrt_bindings/*.pyi``
    without a ``py.typed`` marker (so mypy skips them where pip put them), and its generated stubs have
    syntax errors: parameters named ``in`` (a keyword) and a parameter without a default after ones with
    defaults. The copy renames ``in`` to ``in_`` and gives that parameter a default; nothing else changes.
    """
    dist = importlib.metadata.distribution("tensorrt-stubs")
    for f in dist.files or []:
        if f.suffix == ".pyi":
            target = dest / f
            target.parent.mkdir(parents=True, exist_ok=True)
            text = Path(dist.locate_file(f)).read_text()
            text = re.sub(r"(\(|, )in: ", r"\1in_: ", text)
            text = re.sub(r"(def [^\n]*=[^\n]*?, )(\w+): (\w+)\)", r"\1\2: \3 = ...)", text)
            target.write_text(text)
    if not (dest / "tensorrt" / "__init__.pyi").is_file():
        raise FileNotFoundError("tensorrt-stubs has no tensorrt/__init__.pyi")
    return dest


def test_mypy_against_tensorrt_stubs(tmp_path):
    """The TensorRT code type-checks against the TensorRT 10 API (tensorrt-stubs, installed with --no-deps:
    its metadata requires the real tensorrt, which cannot be installed here; see .ci/run)."""
    if importlib.util.find_spec("mypy") is None:
        pytest.skip("mypy is not installed (it is in the test extra: pip install -e '.[test]')")
    try:
        importlib.metadata.distribution("tensorrt-stubs")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("tensorrt-stubs is not installed (pip install --no-deps tensorrt-stubs==10.13.0.35.1, as .ci/run does)")
    stubs = patched_stubs(tmp_path / "stubs")
    config = tmp_path / "mypy.ini"
    config.write_text(MYPY_CONFIG)
    env = {"MYPYPATH": str(stubs), "PATH": "", "HOME": str(tmp_path)}
    result = subprocess.run([sys.executable, "-m", "mypy", "--config-file", str(config), "--cache-dir", str(tmp_path / "cache"),
                             *TYPED], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    print(result.stdout[-3000:])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Success" in result.stdout
    # the check is real: a wrong call into the API fails it
    bad = tmp_path / "bad_trt.py"
    bad.write_text("import tensorrt as trt\n\n\ndef f(b: trt.Builder) -> None:\n    b.create_network('x')\n")
    shutil.copy(config, tmp_path / "mypy2.ini")
    result = subprocess.run([sys.executable, "-m", "mypy", "--config-file", str(config), "--cache-dir", str(tmp_path / "cache"),
                             str(bad)], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 1 and "create_network" in result.stdout, result.stdout
