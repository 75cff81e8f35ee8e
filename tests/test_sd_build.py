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


# ---- the SD recipes: recovery on a prompt file, 2:4 where the target has sparse tensor cores --------------

SD_RECIPES = {"recipes/sd15_jetson.yaml": True, "recipes/sd15_jetson_nano.yaml": True, "recipes/sd15_gpu.yaml": True,
              "recipes/sd15_cpu.yaml": False}  # path -> 2:4 expected (cuda and Jetson have sparse tensor cores)


@pytest.mark.parametrize("path, sparse", SD_RECIPES.items())
def test_sd_recipes_recover_on_a_prompt_file_and_use_2to4_where_it_runs(path, sparse):
    from deploykit.recipe import load_recipe
    from tests.conftest import REPO

    recipe = load_recipe(REPO / path)
    distill = recipe.stage("distill")
    assert distill is not None and (REPO / "recipes" / distill.prompts).is_file()
    assert (recipe.stage("sparsify") is not None) == sparse
    assert recipe.topology == "sd15"  # --random-weights builds it offline
    header = (REPO / path).read_text().split("\nname:")[0]
    assert "not implemented" not in header and "--skip distill,eval" in header
    assert run_cli("recipe", "check", path).returncode == 0


# What this proves: sd15_jetson.yaml's stages, in its order and with its settings, run offline to a device
# bundle with distill and eval skipped, and the report and manifest say what was skipped and why. What it
# does not: anything at SD1.5's size. `--set` swaps the topology for tiny-sd (and the sizes that follow from
# it: resolution, channel rounding, 2:4's minimum layer width) because SD1.5 at 512x512 takes hours on a
# 2-core CPU; every other setting comes from the recipe file.
JETSON_TINY = ["topology=tiny-sd", "resolution=32", "prune.round_to=4", "sparsify.min_features=16", "bundle.warmup=1",
               "bundle.runs=3"]


def _set(items):
    return [a for item in items for a in ("--set", item)]


@pytest.mark.slow
def test_sd15_jetson_offline_speed_build_skips_distill_and_eval_and_runs_to_its_bundle(tmp_path):
    out = tmp_path / "out"
    result = run_cli("build", "recipes/sd15_jetson.yaml", "--random-weights", "--skip", "distill,eval",
                     *_set(JETSON_TINY), "--out", str(out))
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "report.json").read_text())
    manifest = json.loads((out / "manifest.json").read_text())
    why = "--skip on the command line; a --random-weights build measures speed only"
    assert report["skipped"] == manifest["skipped"] == {"distill": why, "eval": why}
    assert manifest["overrides"] == JETSON_TINY and manifest["recipe"]["topology"] == "tiny-sd"
    assert [s["name"] for s in manifest["stages"]] == ["teacher", "prune", "sparsify", "export", "bundle"]
    assert "pruned" not in report and "eval" not in report  # no distill: the student is the pruned model
    assert report["teacher_source"] == "random:tiny-sd" and report["bundle"]["components"]["student/unet"]["sparse"]
    bundle = json.loads((out / "bundle" / "bundle.json").read_text())
    assert bundle["target"] == "jetson-agx-orin" and "onnx/student/unet/model.onnx" in bundle["files"]
    md = (out / "report.md").read_text()
    assert "Stages skipped: `distill` (--skip on the command line" in md
    # what export and bundle ran on is the sparsify stage's student: distill passed it through
    sparsify = next(out.glob("stages/*-sparsify-*"))
    from deploykit.io import sha256_file

    assert sha256_file(out / "model" / "model.safetensors") == sha256_file(sparsify / "model" / "model.safetensors")


@pytest.mark.parametrize("args, message", [
    (["--skip", "export"], "--skip export: stage bundle reads onnx, which no other stage"),
    (["--skip", "bench"], "--skip bench: recipes/sd15_jetson.yaml has no bench stage"),
    (["--skip", "bundle"], "--skip bundle: target jetson-agx-orin needs a bundle stage"),
    (["--set", "distill.nope=1"], "(with --set distill.nope=1): stages[2].nope: unknown key"),
    (["--set", "bench.runs=3"], "--set bench.runs: recipes/sd15_jetson.yaml has no bench stage"),
    (["--set", "prune.round_to"], "expected KEY=VALUE"),
    (["--set", "stages.prune.round_to=4"], "by the stage's name"),
])
def test_a_skip_or_set_that_cannot_work_exits_2_and_writes_nothing(tmp_path, args, message):
    result = run_cli("build", "recipes/sd15_jetson.yaml", "--random-weights", *args, "--out", str(tmp_path / "out"))
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("attention", ["heads", "head_dims"])
def test_the_prune_stage_shrinks_attention_as_the_recipe_says(tmp_path, attention):
    """A recipe chooses whole heads or per-head dims; the student's attention shows which, and prune.json says so."""
    from diffusers.models.attention_processor import Attention

    from deploykit.models.architecture import load_model

    recipe = write(tmp_path, "random:tiny-sd", stages="")
    result = run_cli("build", str(recipe), "--out", str(tmp_path / "out"), "--set", f"prune.attention={attention}")
    assert result.returncode == 0, result.stderr
    stage = next((tmp_path / "out").glob("stages/*-prune-*"))
    assert json.loads((stage / "prune.json").read_text())["attention"] == attention
    teacher = {n: m for n, m in load_model(next((tmp_path / "out").glob("stages/*-teacher-*")) / "model").named_modules()
               if isinstance(m, Attention)}
    student = {n: m for n, m in load_model(stage / "model").named_modules() if isinstance(m, Attention)}
    shrunk = [n for n in student if student[n].to_q.out_features < teacher[n].to_q.out_features]
    assert shrunk, "the search pruned no attention width at half the MACs"
    for n in shrunk:
        head_dim = (student[n].to_q.out_features // student[n].heads, teacher[n].to_q.out_features // teacher[n].heads)
        if attention == "heads":
            assert student[n].heads < teacher[n].heads and head_dim[0] == head_dim[1], n
        else:
            assert student[n].heads == teacher[n].heads and head_dim[0] < head_dim[1], n
