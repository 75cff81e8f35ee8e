"""The openvino-cpu backend: the runtime, serve, the bench stage (fp32 and INT8 graphs, peers, end to end)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from deploykit.runtime import Pipeline
from tests.conftest import REPO, run_cli

pytest.importorskip("openvino")


def pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


@pytest.fixture
def ov_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DEPLOYKIT_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache" / "openvino"


def test_openvino_runs_the_artifacts_onnx_as_onnx_runtime_does(zoo_serve_artifact, zoo_pipeline, ov_cache):
    pipe = Pipeline.from_artifact(zoo_serve_artifact, backend="openvino-cpu")
    assert pipe.backend == "openvino-cpu" and pipe.info()["backend"] == "openvino-cpu"
    a, b = pipe(steps=4, seed=3, num_images=2), zoo_pipeline(steps=4, seed=3, num_images=2)
    for x, y in zip(a, b):
        assert np.abs(pixels(x) - pixels(y)).max() <= 1  # the same graph in fp32, two runtimes
    # the compiled UNet is kept outside the artifact, in a folder named after its files' digests
    blobs = sorted(ov_cache.rglob("*.blob"))
    assert len(blobs) == 1
    stamp = blobs[0].stat().st_mtime_ns
    again = Pipeline.from_artifact(zoo_serve_artifact, backend="openvino-cpu")
    assert sorted(ov_cache.rglob("*.blob")) == blobs and blobs[0].stat().st_mtime_ns == stamp  # read, not rebuilt
    np.testing.assert_array_equal(pixels(again(steps=4, seed=3)[0]), pixels(a[0]))
    inspect = run_cli("inspect", str(zoo_serve_artifact))
    assert inspect.returncode == 0, inspect.stderr  # nothing was written into the artifact


def test_the_cache_folder_follows_the_graphs_content():
    from deploykit.runtime.openvino import cache_folder

    assert cache_folder(["a", "b"]) == cache_folder(["b", "a"])
    assert cache_folder(["a", "b"]) != cache_folder(["a", "c"])


def test_openvino_runs_a_whole_sd_pipeline(sd_serve_artifact, sd_pipeline, ov_cache):
    pipe = Pipeline.from_artifact(sd_serve_artifact, backend="openvino-cpu")
    kwargs = {"negative_prompt": "blurry", "steps": 3, "seed": 7, "guidance_scale": 6.0}
    a, b = pipe("a lighthouse", **kwargs)[0], sd_pipeline("a lighthouse", **kwargs)[0]
    assert a.size == b.size and np.abs(pixels(a) - pixels(b)).max() <= 2
    # text encoder, UNet and VAE decoder: each compiled once, each from the artifact's own graph
    assert len(list(ov_cache.rglob("*.blob"))) == 3


def _without_openvino(tmp_path) -> dict:
    """An environment in which `import openvino` fails, as it does where the extra is not installed."""
    blocker = tmp_path / "blocker" / "openvino"
    blocker.mkdir(parents=True, exist_ok=True)
    (blocker / "__init__.py").write_text("raise ImportError('No module named openvino')\n")
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "blocker"), str(REPO)])}


def test_without_openvino_a_recipe_naming_it_exits_2_before_any_stage(tmp_path, zoo_env):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: x\nteacher: zoo:digits-tiny\nstages:\n  - stage: prune\n  - stage: export\n"
                      "  - stage: bench\n    backends: [onnxruntime-cpu, openvino-cpu]\n")
    env = {**_without_openvino(tmp_path), "DEPLOYKIT_ZOO_DIR": zoo_env["DEPLOYKIT_ZOO_DIR"]}
    result = run_cli("build", str(recipe), "--out", str(tmp_path / "out"), env=env)
    assert result.returncode == 2, result.stderr
    assert "bench backend openvino-cpu: openvino is not installed (pip install 'deploykit[openvino]')" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()


def test_without_openvino_serve_and_the_runtime_name_the_extra(tmp_path, zoo_serve_artifact):
    result = run_cli("serve", str(zoo_serve_artifact), "--backend", "openvino-cpu", "--port", "0",
                     env=_without_openvino(tmp_path))
    assert result.returncode == 2, result.stderr
    assert "backend openvino-cpu cannot run here: openvino is not installed (pip install 'deploykit[openvino]')" \
        in result.stderr and "Traceback" not in result.stderr
    script = f"from deploykit.runtime import Pipeline; print(Pipeline.from_artifact({str(zoo_serve_artifact)!r}).backend)"
    chosen = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=_without_openvino(tmp_path),
                            cwd=REPO, timeout=300)
    assert chosen.stdout.strip() == "onnxruntime-cpu", chosen.stderr  # the default never needed it


SD_BENCH = """\
name: tiny-sd-openvino
teacher: random:tiny-sd
resolution: 32
seed: 0
stages:
  - stage: prune
    macs_target: 0.5
    round_to: 4
  - stage: export
    check_batch: 2
  - stage: quantize
    calibration_samples: 2
    calibration_steps: 2
  - stage: bench
    backends: [torch-cpu, onnxruntime-cpu, openvino-cpu]
    warmup: 1
    runs: 3
    end_to_end:
      steps: 2
      runs: 2
      warmup: 1
"""


@pytest.fixture(scope="module")
def ov_bench_report(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ov-bench")
    (folder / "r.yaml").write_text(SD_BENCH)
    result = run_cli("build", str(folder / "r.yaml"), "--out", str(folder / "out"))
    assert result.returncode == 0, result.stderr
    return json.loads((folder / "out" / "report.json").read_text()), (folder / "out" / "report.md").read_text()


def test_bench_times_fp32_and_int8_graphs_on_openvino(ov_bench_report):
    report, md = ov_bench_report
    for model in ("teacher", "student", "teacher-int8", "student-int8"):
        for backend in ("onnxruntime-cpu", "openvino-cpu"):
            entry = report[model]["latency"][backend]
            assert entry["runs"] == 3 and entry["device"] and 0 < entry["p50_ms"] <= entry["p90_ms"]
    assert "openvino-cpu" not in report["teacher-int8"]["latency"].get("torch-cpu", {})
    ov = {m: report[m]["latency"]["openvino-cpu"]["p50_ms"] for m in ("teacher", "student", "student-int8")}
    assert report["speedup"]["openvino-cpu"] == pytest.approx(ov["teacher"] / ov["student"], rel=1e-12)
    assert report["speedup_int8"]["openvino-cpu"] == pytest.approx(ov["teacher"] / ov["student-int8"], rel=1e-12)
    assert "openvino-cpu" in md


def test_peers_set_the_fastest_student_against_torch_eager_and_the_fastest_dense(ov_bench_report):
    report, md = ov_bench_report
    peers = report["peers"]
    lat = {(b, m): report[m]["latency"][b]["p50_ms"] for m in ("teacher", "student", "teacher-int8", "student-int8")
           for b in report[m]["latency"]}
    label = {(b, m): f"{b} {'int8' if m.endswith('int8') else 'fp32'}" for b, m in lat}
    best = min((k for k in lat if k[1].startswith("student")), key=lat.get)
    fastest_dense = min((k for k in lat if k[1].startswith("teacher")), key=lat.get)
    assert (peers["student"]["config"], peers["student"]["model"]) == (label[best], best[1])
    assert peers["vs_dense_torch_eager_fp32"]["config"] == "torch-cpu fp32"
    assert peers["vs_dense_torch_eager_fp32"]["speedup"] == pytest.approx(lat["torch-cpu", "teacher"] / lat[best], rel=1e-12)
    assert peers["vs_fastest_dense"]["config"] == label[fastest_dense]
    assert peers["vs_fastest_dense"]["speedup"] == pytest.approx(lat[fastest_dense] / lat[best], rel=1e-12)
    assert len(peers["measured_p50_ms"]["dense"]) == len(peers["measured_p50_ms"]["student"]) == 5
    assert f"**{peers['vs_fastest_dense']['speedup']:.2f}x** over the fastest dense configuration" in md


def test_end_to_end_is_timed_component_by_component_on_every_backend(ov_bench_report):
    report, md = ov_bench_report
    e2e = report["end_to_end"]
    assert set(e2e["backends"]) == {"torch-cpu", "onnxruntime-cpu", "openvino-cpu"}
    for backend, v in e2e["backends"].items():
        models = {"teacher", "student"} | ({"teacher-int8", "student-int8"} if backend != "torch-cpu" else set())
        assert set(v["p50_ms"]) == models and v["runs"] == 2
        assert v["speedup"] == pytest.approx(v["teacher_p50_ms"] / v["student_p50_ms"], rel=1e-12)
        for parts in v["p50_ms"].values():
            assert parts["unet_per_step"] == pytest.approx(parts["unet"] / 2)
            # components are timed inside the generation; the total also holds the scheduler's work
            assert 0 < parts["text_encoder"] + parts["unet"] + parts["vae_decoder"] <= parts["total"] * 1.0001
    assert "| openvino-cpu | student-int8 |" in md and "UNet per step ms" in md
