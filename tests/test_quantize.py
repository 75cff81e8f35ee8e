"""INT8: QDQ graphs with the expected layers quantized and the excluded ones float, both paths; the
quantize stage end to end with its bench entries and its quality gate."""

import json

import numpy as np
import pytest
import torch

from deploykit.quantize import onnx_node_module
from deploykit.quantize.calibration import RecordingDenoiser, forward_loop, summarize
from deploykit.quantize.onnx_int8 import OrtInt8Config, int8_layers, output_error, quantize_onnx
from tests.conftest import run_cli

EXCLUDED = ("conv_in/", "conv_out/", "time_embedding/", "time_emb_proj/", "conv_shortcut/")


def _trajectory_batches(unet, steps=3, samples=8):
    """The tiny UNet's inputs along its own DDIM sampling: what the quantize stage calibrates on."""
    from deploykit.runtime import TorchBackend, make_scheduler
    from deploykit.runtime.sampling import sample

    recorder = RecordingDenoiser(TorchBackend(unet), ("sample", "timestep"))
    noise = torch.randn(samples, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    sample(recorder, make_scheduler("ddim", {"num_train_timesteps": 1000}), noise, steps)
    return recorder.batches


@pytest.fixture
def exported(tiny_unet, tmp_path):
    from deploykit.export import export_unet
    from deploykit.models.inputs import example_unet_inputs

    path = tmp_path / "fp32" / "model.onnx"
    export_unet(tiny_unet, path, example_unet_inputs(tiny_unet, 2))
    return path


def _kind(name: str) -> str:
    if any(e in name for e in EXCLUDED):
        return "excluded"
    if name.endswith(("/MatMul", "/MatMul_1")) and "/to_" not in name:
        return "attention-bmm"  # Q·K^T and attention·V: activation x activation
    return "quantized"


def test_onnx_node_names_map_to_module_names():
    assert onnx_node_module("/unet/down_blocks.0/resnets.0/conv1/Conv") == "down_blocks.0.resnets.0.conv1"
    assert onnx_node_module("/unet/conv_in/Conv") == "conv_in"
    assert onnx_node_module("/conv_in/Conv") == "conv_in"
    assert onnx_node_module("Conv_12") is None


def test_calibration_follows_the_teachers_trajectory(tiny_unet):
    batches = _trajectory_batches(tiny_unet, steps=3, samples=4)
    info = summarize(batches)
    assert info["batches"] == 3 and info["samples"] == 12 and info["timesteps"]["distinct"] == 3
    # each step's sample is the previous step's output, not fresh noise
    assert not np.allclose(batches[0]["sample"], batches[1]["sample"])


def test_onnxruntime_int8_puts_qdq_where_expected_and_keeps_excluded_layers_float(tiny_unet, exported, tmp_path):
    batches = _trajectory_batches(tiny_unet)
    dst = tmp_path / "int8" / "model.onnx"
    summary = quantize_onnx(exported, dst, batches, OrtInt8Config())
    assert summary["qdq"]["QuantizeLinear"] > 0 and summary["qdq"]["DequantizeLinear"] > 0
    layers = int8_layers(dst)
    kinds = {name: _kind(name) for name in layers}
    assert {"excluded", "attention-bmm", "quantized"} <= set(kinds.values())
    for name, state in layers.items():
        if kinds[name] == "quantized":
            assert state == {"weight": True, "activation": True}, name
        else:
            assert not state["weight"] and not state["activation"], f"{name} should stay float: {state}"
    for must in ("/unet/conv_in/Conv", "/unet/conv_out/Conv", "/unet/time_embedding/linear_1/Gemm"):
        assert layers[must] == {"weight": False, "activation": False}
    assert summary["quantized_nodes"] == sum(k == "quantized" for k in kinds.values())
    # float weights of excluded layers are still float initializers; quantized ones are int8
    import onnx

    graph = onnx.load(str(dst)).graph
    inits = {i.name: i.data_type for i in graph.initializer}
    conv_in = next(n for n in graph.node if n.name == "/unet/conv_in/Conv")
    assert inits[conv_in.input[1]] == onnx.TensorProto.FLOAT
    assert onnx.TensorProto.INT8 in inits.values()
    error = output_error(exported, dst, batches[:2])
    assert error["snr_db"] > 10, error


def test_a_custom_exclude_list_is_honoured(tiny_unet, exported, tmp_path):
    batches = _trajectory_batches(tiny_unet, steps=2)
    dst = tmp_path / "int8" / "model.onnx"
    quantize_onnx(exported, dst, batches, OrtInt8Config(exclude=("down_blocks.*",)))
    layers = int8_layers(dst)
    assert not any(v["weight"] for n, v in layers.items() if "/down_blocks." in n)
    assert layers["/unet/conv_in/Conv"]["weight"] and layers["/unet/up_blocks.0/resnets.0/conv1/Conv"]["weight"]


def test_modelopt_int8_smoothquant_exports_qdq_with_exclusions(tiny_unet, exported, tmp_path):
    from deploykit.quantize.modelopt_int8 import modelopt_available

    if not modelopt_available():
        print("SKIPPED: nvidia-modelopt is not installed (pip install 'deploykit[modelopt]')")
        pytest.skip("nvidia-modelopt is not installed (pip install 'deploykit[modelopt]')")
    from deploykit.models.inputs import example_unet_inputs
    from deploykit.models.wrappers import TensorOutput
    from deploykit.quantize.modelopt_int8 import export_qdq_onnx, quantize_modelopt, quantizer_states

    batches = _trajectory_batches(tiny_unet)
    quantized = quantize_modelopt(TensorOutput(tiny_unet), forward_loop(batches, ("sample", "timestep")))
    states = quantizer_states(quantized)
    assert not states["conv_in"] and not states["conv_out"] and not states["time_embedding.linear_1"]
    assert states["down_blocks.0.resnets.0.conv1"] and states["mid_block.attentions.0.to_q"]
    assert not any(v for n, v in states.items() if n.endswith(("time_emb_proj", "conv_shortcut")))
    dst = export_qdq_onnx(quantized, tmp_path / "mo" / "model.onnx", example_unet_inputs(tiny_unet, 2))
    layers = int8_layers(dst)
    for name, state in layers.items():
        if _kind(name) == "excluded":
            assert not state["weight"] and not state["activation"], name
        elif _kind(name) == "quantized":
            assert state == {"weight": True, "activation": True}, name
    assert output_error(exported, dst, batches[:2])["snr_db"] > 10  # the QDQ graph runs in ONNX Runtime too


QUANTIZE_RECIPE = """\
name: tiny-int8
teacher: zoo:digits-tiny
seed: 0
stages:
  - stage: prune
    macs_target: 0.5
    round_to: 4
  - stage: export
  - stage: quantize
    calibration_samples: 16
    calibration_steps: 4
{gate}  - stage: bench
    backends: [onnxruntime-cpu]
    batch_size: 8
    warmup: 1
    runs: 5
  - stage: eval
    num_samples: 32
    steps: 4
    grid_samples: 8
"""


def _recipe(folder, gate: str):
    path = folder / "int8.yaml"
    path.write_text(QUANTIZE_RECIPE.format(gate=gate))
    return path


def test_build_with_quantize_reports_int8_and_enforces_the_quality_gate(tmp_path, zoo_env):
    out = tmp_path / "out"
    loose = "    max_quality_loss:\n      fid: 1000\n      psnr_vs_teacher: 100\n"
    result = run_cli("build", str(_recipe(tmp_path, loose)), "--out", str(out), env=zoo_env)
    assert result.returncode == 0, result.stderr
    assert "INT8 quality gate passed" in result.stderr
    report = json.loads((out / "report.json").read_text())
    for role in ("teacher-int8", "student-int8"):
        lat = report[role]["latency"]["onnxruntime-cpu"]
        assert lat["runs"] == 5 and lat["p50_ms"] > 0
        assert {"fid", "psnr_vs_teacher", "ssim_vs_teacher"} <= set(report[role]["quality"])
    expected = report["teacher"]["latency"]["onnxruntime-cpu"]["p50_ms"] / report["student-int8"]["latency"]["onnxruntime-cpu"]["p50_ms"]
    assert abs(report["speedup_int8"]["onnxruntime-cpu"] - expected) < 1e-9
    int8 = report["int8"]
    assert int8["backend"] == "onnxruntime" and int8["gate"]["status"] == "passed"
    assert set(int8["quality_loss"]) == {"fid", "psnr_vs_teacher", "ssim_vs_teacher"}
    assert int8["calibration"]["batches"] == 4 and int8["models"]["student"]["layers"]["int8"] > 0
    assert (out / "onnx_int8" / "unet" / "model.onnx").is_file()
    md = (out / "report.md").read_text()
    assert "student-int8" in md and "Quality gate" in md and f"{report['speedup_int8']['onnxruntime-cpu']:.2f}x" in md

    # changing only the limit re-runs no stage (it is in no cache key) and rewrites the report
    result = run_cli("build", str(_recipe(tmp_path, loose.replace("100", "99"))), "--out", str(out), env=zoo_env)
    assert result.returncode == 0, result.stderr
    assert "quantize: up to date" in result.stderr and "eval: up to date" in result.stderr
    assert json.loads((out / "report.json").read_text())["int8"]["max_quality_loss"]["psnr_vs_teacher"] == 99

    # a crude quantization (per-tensor 7-bit weights, nothing excluded, one calibration batch) against a limit of
    # no loss at all: exit code 3, one clear line, and the finished artifact is left as it was
    outputs = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and "stages" not in p.parts}
    crude = ("    per_channel: false\n    reduce_range: true\n    activations: int8\n    exclude: []\n"
             "    max_quality_loss:\n      fid: 0\n      psnr_vs_teacher: 0\n      ssim_vs_teacher: 0\n")
    text = QUANTIZE_RECIPE.replace("calibration_samples: 16", "calibration_samples: 1").replace("calibration_steps: 4",
                                                                                                 "calibration_steps: 1")
    (tmp_path / "crude.yaml").write_text(text.format(gate=crude))
    result = run_cli("build", str(tmp_path / "crude.yaml"), "--out", str(out), env=zoo_env)
    assert result.returncode == 3, result.stderr
    assert "quality gate failed" in result.stderr and "(at most 0 accepted)" in result.stderr
    assert "Traceback" not in result.stderr
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and "stages" not in p.parts} == outputs


@pytest.mark.parametrize("stages, message", [
    ("  - stage: prune\n  - stage: quantize\n", "add an export stage before it"),
    ("  - stage: prune\n  - stage: quantize\n  - stage: export\n", "prune -> export -> quantize"),
    ("  - stage: prune\n  - stage: export\n  - stage: quantize\n    max_quality_loss: {fid: 1}\n", "add an eval stage"),
    ("  - stage: prune\n  - stage: export\n  - stage: quantize\n    max_quality_loss: {}\n  - stage: eval\n",
     "name at least one of fid"),
    ("  - stage: prune\n  - stage: export\n  - stage: quantize\n    backend: tensorrt\n", "backend"),
])
def test_bad_quantize_recipes_exit_2(tmp_path, zoo_env, stages, message):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(f"name: x\nteacher: zoo:digits-tiny\nstages:\n{stages}")
    result = run_cli("build", str(recipe), "--out", str(tmp_path / "out"), env=zoo_env)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_tiny_sd_quantizes_benches_and_loads_in_optimum(tmp_path):
    """The SD path: calibration from prompts through the teacher pipeline, an INT8 UNet in the student's
    fp32 pipeline folder, timed on onnxruntime-cpu; random weights are not evaluated, so the gate is not checked."""
    recipe = tmp_path / "sd.yaml"
    recipe.write_text("name: tiny-sd-int8\nteacher: random:tiny-sd\nresolution: 32\nstages:\n"
                      "  - stage: prune\n    round_to: 4\n  - stage: export\n    check_batch: 2\n"
                      "  - stage: quantize\n    calibration_samples: 2\n    calibration_steps: 2\n"
                      "    max_quality_loss: {psnr_vs_teacher: 1}\n"
                      "  - stage: bench\n    backends: [onnxruntime-cpu]\n    warmup: 1\n    runs: 3\n"
                      "  - stage: eval\n    num_samples: 1\n    steps: 2\n")
    out = tmp_path / "out"
    result = run_cli("build", str(recipe), "--out", str(out))
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "report.json").read_text())
    teacher, int8 = (report[role]["latency"]["onnxruntime-cpu"] for role in ("teacher", "student-int8"))
    assert teacher["runs"] == int8["runs"] == 3 and teacher["device"] and int8["device"]
    assert report["speedup_int8"]["onnxruntime-cpu"] == pytest.approx(teacher["p50_ms"] / int8["p50_ms"], rel=1e-12)
    assert report["int8"]["calibration"]["batches"] == 4  # 2 prompts x 2 steps, batch 2 (guidance)
    assert report["int8"]["gate"]["status"] == "not checked"
    assert int8_layers(out / "onnx_int8" / "unet" / "model.onnx")["/unet/conv_in/Conv"]["weight"] is False

    from optimum.onnxruntime import ORTStableDiffusionPipeline

    pipe = ORTStableDiffusionPipeline.from_pretrained(out / "onnx_int8", provider="CPUExecutionProvider")
    image = pipe("a red bicycle", num_inference_steps=2, height=32, width=32, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 32, 32, 3) and np.isfinite(image).all()
