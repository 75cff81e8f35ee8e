"""The verify stage on the test-size zoo teacher: torch vs ONNX Runtime fp32 and fp16, TensorRT skipped with its
reason; the same build's bench carries the roofline estimate (bench.estimate) into the report."""

from __future__ import annotations

import json

from tests.conftest import run_cli

RECIPE = """\
name: verify
teacher: zoo:digits-tiny
seed: 0
stages:
  - stage: prune
    macs_target: 0.5
    round_to: 4
  - stage: export
    fp16: true
  - stage: verify
    batches: 2
    batch_size: 3
{extra}  - stage: bench
    backends: [torch-cpu]
    batch_size: 8
    warmup: 1
    runs: 3
    estimate: true
"""


def test_verify_passes_then_names_the_worst_output(tmp_path, zoo_env):
    recipe = tmp_path / "verify.yaml"
    recipe.write_text(RECIPE.format(extra=""))
    out = tmp_path / "out"
    result = run_cli("build", str(recipe), "--out", str(out), env=zoo_env)
    assert result.returncode == 0, result.stderr
    verify = json.loads(next((out / "stages").glob("*verify*/verify.json")).read_text())
    for role in ("teacher", "student"):
        checks = verify["roles"][role]
        assert set(checks) == {"onnxruntime-fp32", "onnxruntime-fp16"}
        assert checks["onnxruntime-fp32"]["passed"] and checks["onnxruntime-fp32"]["atol"] == 1e-4
        assert checks["onnxruntime-fp16"]["passed"] and checks["onnxruntime-fp16"]["atol"] == 5e-2
        assert checks["onnxruntime-fp32"]["iterations"] == 2
        assert verify["skipped"][f"{role}/tensorrt"] == "no engine stage in this build"
    report = json.loads((out / "report.json").read_text())
    assert report["verify"]["checks"]["student/onnxruntime-fp16"]["passed"]
    assert "Verify (polygraphy, torch as reference)" in (out / "report.md").read_text()

    # the same build's bench put a roofline estimate beside each measurement (tests/test_roofline.py tests the model)
    est = report["estimate"]["torch-cpu"]
    assert est["device"]["source"].startswith("measured")
    for role in ("teacher", "student"):
        assert est[role]["ms"] > 0 and est[role]["measured_p50_ms"] == report[role]["latency"]["torch-cpu"]["p50_ms"]
    assert est["student"]["ms"] < est["teacher"]["ms"]
    assert "Roofline estimate beside measurement" in (out / "report.md").read_text()

    # the same build with an fp16 tolerance no fp16 graph meets: prune and export are reused, verify fails
    recipe.write_text(RECIPE.format(extra="    fp16_atol: 1.0e-9\n    fp16_rtol: 1.0e-9\n"))
    result = run_cli("build", str(recipe), "--out", str(out), env=zoo_env)
    assert result.returncode == 1, result.stderr
    assert "onnxruntime-fp16 vs torch differs beyond tolerance" in result.stderr
    assert "worst output 'out_sample'" in result.stderr and "max |diff|" in result.stderr
    assert "Traceback" not in result.stderr
