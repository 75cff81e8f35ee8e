"""Text-to-image, proven: the flagship recipe (recipes/shapes_jetson_nano.yaml) built whole on the test-size zoo
teacher, the eval stage's text-to-image metrics wired to the right images and prompts, CLIP score on a small
random CLIP, and the tiny VAE decoder's files.

The build runs the recipe file itself, with `--set` shrinking only sizes and counts (the teacher becomes
zoo:shapes-tiny, trained in the test run; steps, samples and runs become a few): every stage the recipe lists
runs, in its order, with its settings otherwise as written. The figures of a teacher trained for four steps
mean nothing; what is checked is that every section is there, every output loads, and every figure belongs
to the images and prompts it claims to.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from tests.conftest import run_cli

FLAGSHIP = "recipes/shapes_jetson_nano.yaml"
TINY = ["teacher=zoo:shapes-tiny", "prune.round_to=4", "sparsify.min_features=16", "distill.steps=3",
        "distill.batch_size=4", "distill.teacher_samples=4", "distill.teacher_sample_steps=2", "decoder.samples=8",
        "decoder.sample_steps=2", "decoder.steps=3", "decoder.timing_runs=3", "quantize.calibration_samples=2",
        "quantize.calibration_steps=2", "bundle.runs=3", "bundle.warmup=1", "bench.runs=3", "bench.warmup=1",
        "bench.end_to_end.steps=2", "bench.end_to_end.runs=1", "eval.num_samples=6", "eval.steps=2", "eval.batch_size=4"]
MODELS = ("teacher", "pruned", "student", "student-int8")


@pytest.fixture(scope="module")
def flagship(tmp_path_factory, shapes_zoo_dir):
    out = tmp_path_factory.mktemp("flagship") / "out"
    env = {**os.environ, "DEPLOYKIT_ZOO_DIR": str(shapes_zoo_dir), "OMP_NUM_THREADS": "2"}
    args = [a for item in TINY for a in ("--set", item)]
    result = run_cli("build", FLAGSHIP, "--out", str(out), *args, env=env, timeout=1800)
    assert result.returncode == 0, result.stderr
    return out, env


def _report(out) -> dict:
    return json.loads((out / "report.json").read_text())


def _stage(out, name: str):
    return next(out.glob(f"stages/*-{name}-*"))


@pytest.mark.slow
def test_the_flagship_report_has_every_section(flagship):
    out, _ = flagship
    report = _report(out)
    for section in ("prune", "sparsity", "distill", "decoder", "export", "int8", "bundle", "bench", "end_to_end", "eval"):
        assert section in report, section
    assert report["macs_ratio"] <= 0.5 and report["teacher_source"] == "zoo:shapes-tiny"
    for name in MODELS:
        q = report[name]["quality"]
        assert {"prompt_accuracy", "prompt_accuracy_trained", "prompt_accuracy_held_out", "fid"} <= set(q), name
        assert 0 <= q["prompt_accuracy"] <= 1 and q["fid"] >= 0
        assert ("psnr_vs_teacher" in q) == (name != "teacher")
    assert set(report["eval"]["prompt_accuracy"]) == set(MODELS)
    assert set(report["eval"]["prompt_accuracy"]["student"]["per_attribute"]) == {"count", "size", "colour", "shape",
                                                                                   "position"}
    assert report["speedup_int8"]["onnxruntime-cpu"] > 0  # the INT8 student timed beside the fp32 teacher, same run
    assert set(report["end_to_end"]["backends"]) == {"torch-cpu", "onnxruntime-cpu"}
    assert report["bundle"]["components"]["student/unet"] == {"onnx": "onnx/student/unet/model.onnx", "int8": True,
                                                             "sparse": True}
    md = (out / "report.md").read_text()
    for heading in ("Prompt accuracy", "| student-int8 |", "VAE decoder: a tiny decoder", "End to end", "Device bundle"):
        assert heading in md, heading


@pytest.mark.slow
def test_every_stage_output_of_the_flagship_loads(flagship):
    from optimum.onnxruntime import ORTStableDiffusionPipeline

    from deploykit.io import sha256_file
    from deploykit.models import load_model
    from deploykit.models.vae_decoder import TinyDecoder, load_decoder
    from deploykit.runtime import OnnxRuntimeBackend
    from deploykit.sparsity import MASKS_FILE, load_masks

    out, env = flagship
    for name in ("teacher", "prune", "sparsify", "distill"):
        assert type(load_model(_stage(out, name) / "model")).__name__ == "UNet2DConditionModel", name
    student = load_model(out / "model")
    masks = load_masks(out / "model" / MASKS_FILE)
    assert masks and all(bool((student.get_submodule(n).weight[m == 0] == 0).all()) for n, m in masks.items())
    decoder = load_decoder(out / "model" / "vae_decoder")
    assert isinstance(decoder, TinyDecoder)
    # the student's ONNX pipeline decodes with the tiny decoder, not the teacher's
    z = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = decoder(z)
    torch.testing.assert_close(OnnxRuntimeBackend(out / "onnx" / "vae_decoder" / "model.onnx")(z), expected,
                               atol=1e-4, rtol=1e-3)
    for folder in ("onnx", "onnx_int8"):
        pipe = ORTStableDiffusionPipeline.from_pretrained(out / folder, provider="CPUExecutionProvider")
        image = pipe("one small red circle in the center", num_inference_steps=2, height=64, width=64, output_type="np",
                     generator=torch.Generator().manual_seed(0)).images
        assert image.shape == (1, 64, 64, 3) and np.isfinite(image).all(), folder
    verify = subprocess.run([sys.executable, str(out / "bundle" / "run.py"), "verify"], capture_output=True, text=True,
                            timeout=300, env=env)
    assert verify.returncode == 0, verify.stderr
    bundle = json.loads((out / "bundle" / "bundle.json").read_text())
    assert bundle["files"]["onnx/student/vae_decoder/model.onnx"] == sha256_file(out / "onnx" / "vae_decoder" / "model.onnx")


@pytest.mark.slow
def test_the_runtime_decodes_with_the_tiny_decoder_on_torch_and_onnx_alike(flagship):
    from deploykit.runtime import Pipeline

    out, _ = flagship
    images = {b: np.asarray(Pipeline.from_artifact(out, backend=b)("two large blue squares at the top right", steps=2,
                                                                   seed=3)[0], dtype=np.int16)
              for b in ("torch-cpu", "onnxruntime-cpu")}
    # torch runs model/ with model/vae_decoder, ONNX Runtime runs onnx/: the same student, within rounding
    assert np.abs(images["torch-cpu"] - images["onnxruntime-cpu"]).max() <= 2


@pytest.mark.slow
def test_eval_figures_belong_to_the_prompts_and_seeds_they_name(flagship, monkeypatch):
    """The teacher's images regenerated from the prompts and seeds eval records give its figures again; images
    scored against other prompts would not (the classifier's reading is compared prompt by prompt)."""
    from deploykit.eval.attributes import CLASSIFIER_FILE, load_attribute_classifier
    from deploykit.eval.text_to_image import PromptJudge
    from deploykit.models import load_model
    from deploykit.runtime import make_pipeline_scheduler
    from deploykit.stages.data import load_teacher_pipeline
    from deploykit.stages.eval import zoo_evaluation_prompts

    out, env = flagship
    monkeypatch.setenv("DEPLOYKIT_ZOO_DIR", env["DEPLOYKIT_ZOO_DIR"])
    report = _report(out)
    ev = report["eval"]
    teacher_dir = _stage(out, "teacher")
    base = zoo_evaluation_prompts("zoo:shapes-tiny")
    assert ev["reference"]["prompts"] == base and ev["reference"]["prompt_source"] == "zoo:shapes-tiny's evaluation prompts"
    prompts = [base[i % len(base)] for i in range(ev["num_samples"])]
    pipe = load_teacher_pipeline(teacher_dir, load_model(teacher_dir / "model"))
    pipe.scheduler = make_pipeline_scheduler(ev["scheduler"], dict(pipe.scheduler.config))
    images = torch.cat([pipe(p, num_inference_steps=ev["steps"], guidance_scale=ev["reference"]["guidance_scale"],
                             height=64, width=64, output_type="pt", generator=torch.Generator().manual_seed(i)).images
                        for i, p in enumerate(prompts)]) * 2 - 1
    judge = PromptJudge(load_attribute_classifier(teacher_dir / CLASSIFIER_FILE), prompts)
    flat, breakdown = judge.score(images)
    assert report["teacher"]["quality"]["prompt_accuracy"] == pytest.approx(flat["prompt_accuracy"])
    assert report["teacher"]["quality"]["fid"] == pytest.approx(flat["fid"], rel=1e-3, abs=1e-6)
    assert ev["prompt_accuracy"]["teacher"]["per_attribute"] == pytest.approx(breakdown["per_attribute"])
    assert ev["reference"]["chance"] == pytest.approx(0.29, abs=0.01)


def test_distill_and_eval_prompts_must_not_meet(tmp_path, shapes_zoo_dir):
    from deploykit.stages.eval import zoo_evaluation_prompts

    env = {**os.environ, "DEPLOYKIT_ZOO_DIR": str(shapes_zoo_dir)}
    prompts = tmp_path / "distill.txt"
    prompts.write_text("\n".join(["one small red circle in the center"] + zoo_evaluation_prompts("zoo:shapes-tiny")[:1]))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"name: leak\nteacher: zoo:shapes-tiny\nstages:\n  - stage: prune\n    round_to: 4\n"
                      f"  - stage: distill\n    steps: 1\n    prompts: {prompts.name}\n  - stage: eval\n    num_samples: 2\n")
    result = run_cli("build", str(recipe), "--out", str(tmp_path / "out"), env=env)
    assert result.returncode == 2 and "also distill prompts" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


# ---- the tiny decoder --------------------------------------------------------------------------------------

def test_the_tiny_decoder_round_trips_and_replaces_the_vae_decoder(tmp_path):
    from diffusers import AutoencoderKL

    from deploykit.models.vae_decoder import save_decoder, tiny_decoder_for, use_decoder

    vae = AutoencoderKL(block_out_channels=[8, 16], latent_channels=4, norm_num_groups=4,
                        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2).eval()
    torch.manual_seed(0)
    tiny = tiny_decoder_for(vae, [8, 8], [1, 1]).eval()
    save_decoder(tiny, tmp_path / "dec")
    z = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        expected = tiny(z)
        use_decoder(vae, tmp_path / "dec")
        decoded = vae.decode(z).sample
    assert decoded.shape == (2, 3, 16, 16)
    torch.testing.assert_close(decoded, expected)
    with pytest.raises(ValueError, match="2 levels"):
        tiny_decoder_for(vae, [8, 8, 8], [1, 1, 1])


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / "decoder.json").unlink(), "is missing"),
    (lambda d: (d / "decoder.json").write_text('{"kind": "huge"}'), "decoder kind"),
    (lambda d: (d / "decoder.json").write_text("[1, 2"), "not a decoder description"),
    (lambda d: (d / "decoder.json").write_text(json.dumps({**json.loads((d / "decoder.json").read_text()),
                                                           "block_out_channels": [16, 16]})), "do not fit"),
])
def test_a_damaged_decoder_folder_is_one_input_error(tmp_path, damage, message):
    from diffusers import AutoencoderKL

    from deploykit.errors import InputError
    from deploykit.models.vae_decoder import load_decoder, save_decoder, tiny_decoder_for

    vae = AutoencoderKL(block_out_channels=[8, 16], latent_channels=4, norm_num_groups=4,
                        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2)
    save_decoder(tiny_decoder_for(vae, [8, 8], [1, 1]), tmp_path / "dec")
    damage(tmp_path / "dec")
    with pytest.raises(InputError, match=message):
        load_decoder(tmp_path / "dec")


def test_decoder_distillation_learns_the_teachers_decoding():
    """A few hundred steps on a fixed teacher: the student's error against it falls well below where it started."""
    from diffusers import AutoencoderKL

    from deploykit.distill.decoder import DecoderDistillConfig, distill_decoder
    from deploykit.models.vae_decoder import tiny_decoder_for

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=[8, 16], latent_channels=4, norm_num_groups=4,
                        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2).eval()
    student = tiny_decoder_for(vae, [16, 16], [1, 1])
    latents = torch.randn(32, 4, 8, 8, generator=torch.Generator().manual_seed(1))

    def teacher(z):
        return vae.decode(z).sample

    def error() -> float:
        with torch.no_grad():
            return float(torch.nn.functional.mse_loss(student(latents), teacher(latents)))

    before = error()
    losses = distill_decoder(student, teacher, latents, DecoderDistillConfig(steps=150, batch_size=8, lr=3e-3))
    assert len(losses) == 150 and not student.training
    assert error() < 0.25 * before


def test_decoder_stage_needs_a_pipeline_teacher(tmp_path, zoo_dir):
    recipe = tmp_path / "recipe.yaml"
    (tmp_path / "p.txt").write_text("a cat\n")
    recipe.write_text("name: d\nteacher: zoo:digits-tiny\nstages:\n  - stage: prune\n    round_to: 4\n"
                      "  - stage: decoder\n    prompts: p.txt\n")
    result = run_cli("build", str(recipe), "--out", str(tmp_path / "out"),
                     env={**os.environ, "DEPLOYKIT_ZOO_DIR": str(zoo_dir)})
    assert result.returncode == 2 and "has none" in result.stderr and "Traceback" not in result.stderr


# ---- CLIP score -------------------------------------------------------------------------------------------

CLIP_SEED = 2  # a random CLIP whose score on these images is not clamped to 0 (torchmetrics clamps at 0)


def _small_clip(folder):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from deploykit.models.topologies import build_tokenizer

    tokenizer = build_tokenizer()
    config = CLIPConfig(text_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                                         vocab_size=len(tokenizer), max_position_embeddings=77),
                        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                                           image_size=32, patch_size=8), projection_dim=16)
    torch.manual_seed(CLIP_SEED)
    CLIPModel(config).save_pretrained(folder, safe_serialization=True)
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=processor, tokenizer=tokenizer).save_pretrained(folder)


def test_clip_score_of_a_hub_style_teacher_from_local_clip_weights(tmp_path):
    """A local SD pipeline folder (what a hub teacher is once downloaded) and a small random CLIP saved beside the
    recipe: eval reports CLIP score for every model, the same number torchmetrics gives on the same images."""
    from deploykit.eval.text_to_image import clip_score, load_clip
    from deploykit.models.topologies import build_pipeline

    build_pipeline("tiny-sd").save_pretrained(tmp_path / "teacher", safe_serialization=True)
    _small_clip(tmp_path / "clip")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("name: clip\nteacher: teacher\nresolution: 32\nstages:\n  - stage: prune\n    round_to: 4\n"
                      "  - stage: eval\n    num_samples: 3\n    steps: 2\n    clip_model: clip\n"
                      "    prompts: [a red bicycle, a cat on a mat, a lighthouse]\n")
    result = run_cli("build", str(recipe), "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["eval"]["reference"]["clip_model"] == "clip"
    scores = {m: report[m]["quality"]["clip_score"] for m in ("teacher", "student")}
    assert all(0 <= s <= 100 for s in scores.values())

    from deploykit.models import load_model
    from deploykit.runtime import make_pipeline_scheduler
    from deploykit.stages.data import load_teacher_pipeline

    teacher_dir = _stage(tmp_path / "out", "teacher")
    pipe = load_teacher_pipeline(teacher_dir, load_model(teacher_dir / "model"))
    pipe.scheduler = make_pipeline_scheduler("ddim", dict(pipe.scheduler.config))
    prompts = report["eval"]["reference"]["prompts"]
    images = torch.cat([pipe(p, num_inference_steps=2, height=32, width=32, output_type="pt",
                             generator=torch.Generator().manual_seed(i)).images for i, p in enumerate(prompts)]) * 2 - 1
    expected = clip_score(images, prompts, load_clip(tmp_path / "clip"))
    assert expected > 0, "pick a CLIP_SEED whose score is not clamped to 0"
    assert scores["teacher"] == pytest.approx(expected, rel=1e-3)
    assert "CLIP score with `clip`" in (tmp_path / "out" / "report.md").read_text()


def test_a_clip_model_that_is_neither_a_folder_nor_a_hub_id_is_refused(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("name: clip\nteacher: random:tiny-sd\nstages:\n  - stage: prune\n    round_to: 4\n"
                      "  - stage: eval\n    clip_model: no-such-folder\n")
    result = run_cli("build", str(recipe), "--out", str(tmp_path / "out"))
    assert result.returncode == 2 and "no such folder" in result.stderr and "Traceback" not in result.stderr


def test_eval_prompts_a_zoo_teacher_cannot_read_back_are_refused(tmp_path, shapes_zoo_dir):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("name: odd\nteacher: zoo:shapes-tiny\nstages:\n  - stage: prune\n    round_to: 4\n"
                      "  - stage: eval\n    prompts: [one small red circle in the center, a red bicycle]\n")
    result = run_cli("build", str(recipe), "--out", str(tmp_path / "out"),
                     env={**os.environ, "DEPLOYKIT_ZOO_DIR": str(shapes_zoo_dir)})
    assert result.returncode == 2 and "not a shapes prompt: 'a red bicycle'" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()
