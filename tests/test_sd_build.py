"""Stable Diffusion through `deploykit build`: tiny SD / SDXL topologies, offline."""

import json

import pytest
import torch

from tests.conftest import run_cli

SD_RECIPE = """\
name: tiny-sd
teacher: {teacher}
{extra}resolution: 32
seed: 0
stages:
  - stage: prune
    macs_target: 0.5
    round_to: 4
{stages}"""

EXPORT_BENCH = """\
  - stage: export
    check_batch: 2
  - stage: bench
    warmup: 1
    runs: 3
    end_to_end:
      steps: 2
      runs: 1
      warmup: 0
"""


def _assert_figures_of_one_run(report: dict, runs: int, backends=("torch-cpu", "onnxruntime-cpu")):
    """What every benched build guarantees: MACs at or under the target, and each speedup the teacher's
    p50 over the student's, from entries that carry their run count and device."""
    assert report["macs_ratio"] <= 0.5
    assert report["macs_ratio"] == pytest.approx(report["student"]["macs"] / report["teacher"]["macs"])
    assert set(report["speedup"]) == set(backends)
    for backend in backends:
        teacher, student = (report[role]["latency"][backend] for role in ("teacher", "student"))
        for entry in (teacher, student):
            assert entry["runs"] == runs and entry["device"] and 0 < entry["p50_ms"] <= entry["p90_ms"]
        assert report["speedup"][backend] == pytest.approx(teacher["p50_ms"] / student["p50_ms"], rel=1e-12)


def write(folder, teacher: str, extra: str = "", stages: str = EXPORT_BENCH):
    path = folder / "recipe.yaml"
    path.write_text(SD_RECIPE.format(teacher=teacher, extra=extra, stages=stages))
    return path


@pytest.fixture(scope="module")
def tiny_sd_artifact(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sd")
    # a hub id with a known topology: --random-weights must build it offline instead of downloading
    recipe = write(folder, "hf:example/not-downloaded", extra="topology: tiny-sd\n",
                   stages=EXPORT_BENCH + "  - stage: eval\n    num_samples: 2\n    steps: 2\n")
    result = run_cli("build", str(recipe), "--out", str(folder / "out"), "--random-weights")
    assert result.returncode == 0, result.stderr
    return folder / "out"


def test_random_weights_build_reports_speed_and_says_so(tiny_sd_artifact):
    out = tiny_sd_artifact
    report = json.loads((out / "report.json").read_text())
    assert report["random_weights"] is True and report["teacher_kind"] == "sd"
    assert report["teacher_source"] == "random:tiny-sd"
    assert report["bench"]["shape"] == [2, 4, 16, 16]  # batch 2 (guidance); the tiny VAE halves 32x32 images
    _assert_figures_of_one_run(report, runs=3)
    for backend in ("torch-cpu", "onnxruntime-cpu"):
        e2e = report["end_to_end"]["backends"][backend]
        assert e2e["runs"] == 1 and e2e["speedup"] == pytest.approx(e2e["teacher_p50_ms"] / e2e["student_p50_ms"])
    assert report["eval"]["skipped"] == "random weights"
    assert report["student"]["quality"] == {}
    assert all(c["passed"] for c in report["export"].values())
    md = (out / "report.md").read_text()
    assert "Random weights" in md and "End to end" in md
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["recipe"]["teacher"] == "random:tiny-sd"


def test_artifact_onnx_folder_generates_with_optimum(tiny_sd_artifact):
    from optimum.onnxruntime import ORTStableDiffusionPipeline

    pipe = ORTStableDiffusionPipeline.from_pretrained(tiny_sd_artifact / "onnx", provider="CPUExecutionProvider")
    image = pipe("a red bicycle", num_inference_steps=2, height=32, width=32, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 32, 32, 3) and bool((image >= 0).all() and (image <= 1).all())


def test_artifact_unet_is_the_pruned_one(tiny_sd_artifact):
    from deploykit.models import count_params, load_model
    from deploykit.models.inputs import example_unet_inputs
    from deploykit.models.topologies import build_unet
    from deploykit.runtime import OnnxRuntimeBackend, TorchBackend

    student = load_model(tiny_sd_artifact / "model")
    assert count_params(student) < count_params(build_unet("tiny-sd"))
    inputs = example_unet_inputs(student, 2, size=16)
    torch.testing.assert_close(OnnxRuntimeBackend(tiny_sd_artifact / "onnx/unet/model.onnx")(*inputs),
                               TorchBackend(student)(*inputs), atol=1e-4, rtol=1e-3)


def test_local_pipeline_folder_teacher_is_evaluated_against_itself(tmp_path):
    from deploykit.models.topologies import build_pipeline

    build_pipeline("tiny-sd").save_pretrained(tmp_path / "teacher", safe_serialization=True)
    recipe = write(tmp_path, "teacher", stages="  - stage: eval\n    num_samples: 2\n    steps: 3\n    grid_samples: 2\n")
    result = run_cli("build", str(recipe), "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["random_weights"] is False
    assert (tmp_path / "out" / "samples" / "teacher_vs_student.png").is_file()
    # the figures are those of the student's images against the teacher's from the same prompts and seeds:
    # regenerated here through both pipelines, they give the same PSNR / SSIM
    from deploykit.eval import psnr_ssim
    from deploykit.models import load_model
    from deploykit.runtime import make_pipeline_scheduler
    from deploykit.stages.data import load_teacher_pipeline

    out, ev = tmp_path / "out", report["eval"]
    teacher_dir = next(out.glob("stages/*/teacher.json")).parent
    prompts = ev["reference"]["prompts"]
    images = {}
    for role, folder in (("teacher", teacher_dir), ("student", out)):
        pipe = load_teacher_pipeline(teacher_dir, load_model(folder / "model"))
        pipe.scheduler = make_pipeline_scheduler(ev["scheduler"], dict(pipe.scheduler.config))
        images[role] = torch.cat([pipe(prompts[i % len(prompts)], num_inference_steps=ev["steps"], height=32, width=32,
                                       guidance_scale=ev["reference"]["guidance_scale"], output_type="pt",
                                       generator=torch.Generator().manual_seed(i)).images for i in range(ev["num_samples"])])
    expected = psnr_ssim(images["student"] * 2 - 1, images["teacher"] * 2 - 1)
    q = report["student"]["quality"]
    assert q == pytest.approx(expected, rel=1e-4)
    assert expected["psnr_vs_teacher"] < 100 and expected["ssim_vs_teacher"] < 1  # the pruned UNet did drift


def test_tiny_sdxl_prunes_exports_and_benches(tmp_path):
    recipe = write(tmp_path, "random:tiny-sdxl", stages="  - stage: export\n    check_batch: 2\n"
                   "  - stage: bench\n    warmup: 1\n    runs: 3\n")
    result = run_cli("build", str(recipe), "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["teacher_kind"] == "sdxl"
    _assert_figures_of_one_run(report, runs=3)
    assert (tmp_path / "out" / "onnx" / "text_encoder_2" / "model.onnx").is_file()


@pytest.mark.parametrize("teacher, extra, stages, message", [
    ("hf:example/unknown", "", "", "no topology known"),
    ("random:sd99", "", "", "unknown topology"),
    ("random:tiny-sd", "", "  - stage: distill\n    steps: 2\n", "Stable Diffusion teachers are distilled on prompts"),
    ("random:tiny-sd", "", "  - stage: prune\n", "appears twice"),
])
def test_bad_sd_input_exits_2_and_writes_nothing(tmp_path, teacher, extra, stages, message):
    recipe = write(tmp_path, teacher, extra, stages)
    result = run_cli("build", str(recipe), "--out", str(tmp_path / "out"), "--random-weights")
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out" / "manifest.json").exists()
