"""End to end through the CLI, on the test-size zoo teacher."""

import json
import os
import signal
import subprocess
import sys
import time

from deploykit.artifact import Artifact, verify_stage
from tests.conftest import REPO, run_cli, write_tiny_recipe

ROLES = ("teacher", "pruned", "student")


def test_report_has_the_figures(built_artifact):
    out, _, _ = built_artifact
    report = json.loads((out / "report.json").read_text())
    for role in ROLES:
        assert report[role]["params"] > 0 and report[role]["macs"] > 0
        assert "fid" in report[role]["quality"]
    for role in ("teacher", "student"):
        for backend in ("torch-cpu", "onnxruntime-cpu"):
            lat = report[role]["latency"][backend]
            assert lat["runs"] == 5 and 0 < lat["p50_ms"] <= lat["p90_ms"] and lat["device"]
    for backend in ("torch-cpu", "onnxruntime-cpu"):
        expected = report["teacher"]["latency"][backend]["p50_ms"] / report["student"]["latency"][backend]["p50_ms"]
        assert abs(report["speedup"][backend] - expected) < 1e-9
    assert report["macs_ratio"] <= 0.5
    assert abs(report["macs_ratio"] - report["student"]["macs"] / report["teacher"]["macs"]) < 1e-9
    for role in ROLES:  # attention's products on top of the convolutions and linear layers
        assert 0 < report[role]["macs_dense_layers"] < report[role]["macs"]
    assert "convolutions and linear layers only" in (out / "report.md").read_text()
    for role in ("pruned", "student"):
        assert {"psnr_vs_teacher", "ssim_vs_teacher"} <= set(report[role]["quality"])
    assert all(c["passed"] for c in report["export"].values())
    md = (out / "report.md").read_text()
    assert "onnxruntime-cpu" in md and f"{report['speedup']['onnxruntime-cpu']:.2f}x" in md


def test_artifact_layout_and_manifest(built_artifact):
    out, _, _ = built_artifact
    for rel in ("model/model.safetensors", "model/architecture.json", "model/scheduler_config.json",
                "onnx/unet/model.onnx", "plots/latency.png", "plots/distill_loss.png",
                "samples/teacher_vs_student.png", "report.md", "report.json", "manifest.json"):
        assert (out / rel).is_file(), rel
    manifest = json.loads((out / "manifest.json").read_text())
    assert [s["name"] for s in manifest["stages"]] == ["teacher", "prune", "distill", "export", "bench", "eval"]
    assert "torch" in manifest["packages"] and "torch-pruning" in manifest["packages"]
    assert "model/model.safetensors" in manifest["files"] and "report.json" in manifest["files"]
    assert Artifact(out).verify() == []
    assert not list(out.rglob("*.pt")) and not list(out.rglob("*.pkl")) and not list(out.rglob("*.bin"))


def test_the_artifact_model_runs_with_the_runtime_alone(built_artifact):
    import torch

    from deploykit.models import load_model
    from deploykit.runtime import OnnxRuntimeBackend, TorchBackend

    out, _, _ = built_artifact
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([5, 900])
    torch.testing.assert_close(OnnxRuntimeBackend(out / "onnx/unet/model.onnx")(x, t),
                               TorchBackend(load_model(out / "model"))(x, t), atol=1e-4, rtol=1e-3)


def test_rerunning_a_finished_build_does_no_work(built_artifact):
    out, recipe, env = built_artifact
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    result = run_cli("build", str(recipe), "--out", str(out), env=env)
    assert result.returncode == 0, result.stderr
    assert "nothing to do" in result.stderr
    assert result.stderr.count("up to date (") == 6
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == stamps


def test_inspect_verifies_and_catches_tampering(built_artifact, tmp_path):
    import shutil

    out, _, env = built_artifact
    ok = run_cli("inspect", str(out), env=env)
    assert ok.returncode == 0 and "all hashes verified" in ok.stderr

    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    weights = copy / "model" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    bad = run_cli("inspect", str(copy), env=env)
    assert bad.returncode == 2
    assert "model/model.safetensors: sha256 differs" in bad.stderr and "Traceback" not in bad.stderr

    stage_file = next((copy / "stages").glob("*-prune-*/prune.json"))
    stage_file.write_text("{}")
    bad = run_cli("inspect", str(copy), env=env)
    assert bad.returncode == 2 and "prune.json: sha256 differs" in bad.stderr

    not_an_artifact = run_cli("inspect", str(tmp_path), env=env)
    assert not_an_artifact.returncode == 2 and "not a deploykit artifact" in not_an_artifact.stderr


def test_bad_input_exits_2_and_writes_nothing(tmp_path, zoo_env):
    malformed = tmp_path / "malformed.yaml"
    malformed.write_text("name: x\nteacher: zoo:digits-tiny\nstages:\n  - stage: prune\n    macs_target: lots\n")
    missing_teacher = tmp_path / "missing.yaml"
    missing_teacher.write_text("name: x\nteacher: ./no/such/unet\nstages:\n  - stage: prune\n")
    unknown_zoo = tmp_path / "zoo.yaml"
    unknown_zoo.write_text("name: x\nteacher: zoo:imagenet\nstages:\n  - stage: prune\n")
    for recipe, message in ((malformed, "stages[0].macs_target"), (missing_teacher, "teacher path does not exist"),
                            (unknown_zoo, "no zoo teacher named 'imagenet'"),
                            (tmp_path / "absent.yaml", "recipe not found")):
        out = tmp_path / f"out-{recipe.stem}"
        result = run_cli("build", str(recipe), "--out", str(out), env=zoo_env)
        assert result.returncode == 2, result.stderr
        assert message in result.stderr and "Traceback" not in result.stderr
        assert not out.exists()

    # a folder that holds something else is never overwritten
    occupied = tmp_path / "occupied"
    (occupied / "plots").mkdir(parents=True)
    (occupied / "plots" / "mine.png").write_bytes(b"not deploykit's")
    good = tmp_path / "good.yaml"
    good.write_text("name: x\nteacher: zoo:digits-tiny\nstages:\n  - stage: prune\n")
    result = run_cli("build", str(good), "--out", str(occupied), env=zoo_env)
    assert result.returncode == 2 and "not a deploykit artifact" in result.stderr
    assert sorted(p.name for p in occupied.rglob("*")) == ["mine.png", "plots"]


def test_a_build_killed_mid_stage_resumes_and_leaves_no_corrupt_file(tmp_path, zoo_env):
    recipe = write_tiny_recipe(tmp_path, distill_steps=80)
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "deploykit.cli", "build", str(recipe), "--out", str(out)],
                            env=zoo_env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 600
    try:
        while time.time() < deadline:
            checkpoints = list(out.glob("stages/.work-distill-*/checkpoints/checkpoint.json"))
            if checkpoints and json.loads(checkpoints[0].read_text())["step"] >= 10:
                break
            assert proc.poll() is None, "the build ended before it could be killed"
            time.sleep(0.2)
        else:
            raise AssertionError("no distill checkpoint appeared")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

    assert not (out / "manifest.json").exists(), "a killed build must not look finished"
    for stage in (out / "stages").iterdir():
        if not stage.name.startswith("."):
            assert verify_stage(stage)[1] == [], f"{stage.name} looks finished but is not intact"

    result = run_cli("build", str(recipe), "--out", str(out), env=zoo_env)
    assert result.returncode == 0, result.stderr
    assert "removed 1 half-written stage folder" in result.stderr
    assert "resuming from the checkpoint at step" in result.stderr
    assert "prune: up to date" in result.stderr
    assert not list((out / "stages").glob(".*-distill-*"))
    assert Artifact(out).verify() == []


def test_a_local_diffusers_folder_teacher_without_data(tmp_path, tiny_unet, zoo_env):
    """A teacher from a diffusers folder: no data set is known, so distill runs on the teacher's
    own samples and quality is fidelity to the teacher (no FID)."""
    tiny_unet.save_pretrained(tmp_path / "my-ddpm" / "unet", safe_serialization=True)
    recipe = tmp_path / "local.yaml"
    recipe.write_text("name: local\nteacher: my-ddpm\nstages:\n  - stage: prune\n    round_to: 4\n"
                      "  - stage: distill\n    steps: 3\n    batch_size: 4\n"
                      "  - stage: eval\n    num_samples: 8\n    steps: 2\n    grid_samples: 4\n")
    out = tmp_path / "out"
    result = run_cli("build", str(recipe), "--out", str(out), env=zoo_env)
    assert result.returncode == 0, result.stderr
    assert "distilling on 512 of its own samples" in result.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["teacher_source"] == "my-ddpm"
    assert "fid" not in report["student"]["quality"] and "psnr_vs_teacher" in report["student"]["quality"]
    assert report["macs_ratio"] <= 0.5
