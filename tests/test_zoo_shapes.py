"""The shapes zoo teacher: its data and captions, tokenizer, attribute classifier, prompt accuracy, training."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from deploykit.zoo import get_entry, shapes
from deploykit.zoo.shapes import ATTRIBUTES, HELD_OUT, Attributes, caption, parse_prompt

SHIPPED = get_entry("shapes").folder


# ---- data and captions ---------------------------------------------------------------------------

def test_every_caption_parses_back_to_its_attributes():
    combos = shapes.all_combinations()
    assert len(combos) == np.prod([len(v) for v in ATTRIBUTES.values()])
    assert all(parse_prompt(caption(a)) == a for a in combos)
    assert caption(Attributes("two", "small", "red", "triangle", "top left")) == "two small red triangles at the top left"
    assert parse_prompt("  One LARGE white circle in   the center ") == Attributes("one", "large", "white", "circle", "center")


@pytest.mark.parametrize("prompt", ["a red circle", "two small red triangle at the top", "", "one small pink circle in the center"])
def test_a_prompt_outside_the_grammar_is_refused_by_name(prompt):
    with pytest.raises(ValueError, match="not a shapes prompt"):
        parse_prompt(prompt)


def test_rendering_is_deterministic_per_seed_and_index():
    attrs = shapes.sample_attributes(12, seed=5)
    a = shapes.render_array(attrs, seed=5)
    assert a.dtype == np.uint8 and a.shape == (12, 64, 64, 3)
    assert np.array_equal(a, shapes.render_array(attrs, seed=5))
    assert np.array_equal(a[3:], shapes.render_array(attrs, seed=5)[3:])
    assert not np.array_equal(a, shapes.render_array(attrs, seed=6))


def _components(mask: np.ndarray) -> list[np.ndarray]:
    from scipy import ndimage

    labels, n = ndimage.label(mask)
    return [np.argwhere(labels == k + 1) for k in range(n)]


def test_what_is_drawn_matches_the_caption():
    """Count, colour, position and size are measured on the pixels of each rendered image."""
    background = np.array(shapes.BACKGROUND)
    for a in shapes.sample_attributes(120, seed=7, held_out=None):
        img = shapes.render(a, np.random.default_rng(0)).astype(int)
        diff = np.abs(img - background).sum(-1)
        mask = diff > 60
        blobs = _components(mask)
        assert len(blobs) == shapes.COUNTS.index(a.count) + 1, caption(a)
        centre = np.argwhere(mask).mean(0)  # (row, column)
        expected = {"top left": (16, 16), "top right": (16, 48), "bottom left": (48, 16), "bottom right": (48, 48),
                    "center": (32, 32)}[a.position]
        assert np.abs(centre - expected).max() < 9, caption(a)
        colour = img[diff > 0.9 * diff.max()].mean(0)  # the shapes' insides, not their anti-aliased edges
        nearest = min(shapes.COLOURS, key=lambda c: np.abs(np.array(shapes.COLOURS[c]) - colour).sum())
        assert nearest == a.colour, caption(a)
        area = mask.sum() / len(blobs)
        assert (area < 70) == (a.size == "small"), (caption(a), area)


def test_the_teachers_data_never_holds_a_held_out_combination():
    images, attrs = shapes.make_dataset(2000, seed=get_entry("shapes").teacher.seed, held_out=False)
    assert len(images) == 2000 and not any((a.colour, a.shape) in HELD_OUT for a in attrs)
    assert {a.colour for a in attrs} == set(shapes.COLOURS) and {a.shape for a in attrs} == set(shapes.SHAPES)
    held = shapes.sample_attributes(50, seed=0, held_out=True)
    assert all((a.colour, a.shape) in HELD_OUT for a in held)


def test_prompt_files_keep_evaluation_and_distillation_apart():
    root = Path(__file__).parents[1] / "recipes" / "prompts"
    evaluation = (root / "shapes_eval.txt").read_text().splitlines()
    distill = (root / "shapes_distill.txt").read_text().splitlines()
    assert not set(evaluation) & set(distill)
    asked = [parse_prompt(p) for p in evaluation + distill]
    assert any(a.held_out for a in asked[:len(evaluation)]) and not any(a.held_out for a in asked[len(evaluation):])
    s = get_entry("shapes").sampling
    assert evaluation == shapes.evaluation_prompts(s.prompts_per_split, s.seed), "regenerate with the module's functions"


# ---- tokenizer -----------------------------------------------------------------------------------

def test_the_tokenizer_gives_each_word_one_token_and_matches_the_bundles_numpy_tokenizer(tmp_path):
    import importlib.util

    from transformers import CLIPTokenizer

    import deploykit.device

    script = Path(deploykit.device.__file__).parent / "scripts" / "run.py"
    spec = importlib.util.spec_from_file_location("bundle_run_py", script)
    bundle_run = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bundle_run  # dataclasses look their module up (alone, no other test did it first)
    spec.loader.exec_module(bundle_run)
    ClipTokenizer = bundle_run.ClipTokenizer
    from deploykit.zoo.tokenizer import save_word_tokenizer

    save_word_tokenizer(shapes.vocabulary(), tmp_path)
    tok = CLIPTokenizer.from_pretrained(tmp_path)
    ids = {w: tok(w, add_special_tokens=False).input_ids for w in shapes.vocabulary()}
    assert all(len(v) == 1 for v in ids.values()) and len({v[0] for v in ids.values()}) == len(ids)
    assert tok.decode(tok("three large blue crosses at the bottom right").input_ids, skip_special_tokens=True) == \
        "three large blue crosses at the bottom right"
    numpy_tok = ClipTokenizer(tmp_path)
    prompts = ["two small red triangles at the top left", "", "Unknown words, 42 and ünïcode!", "one " * 100]
    expected = tok(prompts, padding="max_length", max_length=77, truncation=True).input_ids
    assert numpy_tok(prompts).tolist() == expected


# ---- the shipped classifier and prompt accuracy -------------------------------------------------

@pytest.fixture(scope="module")
def classifier():
    from deploykit.eval.attributes import load_attribute_classifier

    return load_attribute_classifier(SHIPPED / "attributes.safetensors")


@pytest.fixture(scope="module")
def fresh():
    """Images the classifier never saw: a seed used by neither its training nor the teacher's."""
    attrs = shapes.sample_attributes(600, seed=12345, held_out=None)
    return shapes.render_many(attrs, seed=12345), [caption(a) for a in attrs]


def test_the_shipped_classifier_reads_fresh_renders_back(classifier, fresh):
    from deploykit.eval.prompt_accuracy import prompt_accuracy

    result = prompt_accuracy(classifier, *fresh)
    assert min(result["per_attribute"].values()) >= 0.97, result["per_attribute"]
    assert result["held_out"]["accuracy"] >= 0.97 and result["trained"]["accuracy"] >= 0.97
    card = json.loads((SHIPPED / "card.json").read_text())
    assert min(card["classifier_accuracy"].values()) >= 0.97


def test_images_that_ignore_their_prompts_score_near_chance(classifier, fresh):
    from deploykit.eval.prompt_accuracy import chance_accuracy, prompt_accuracy, shuffled_prompt_accuracy

    shuffled = shuffled_prompt_accuracy(classifier, *fresh)
    assert abs(shuffled["accuracy"] - chance_accuracy()) < 0.06
    assert shuffled["all_attributes"] < 0.02
    assert prompt_accuracy(classifier, *fresh)["accuracy"] - shuffled["accuracy"] > 0.5


def test_prompt_accuracy_refuses_mismatched_input(classifier, fresh):
    from deploykit.eval.prompt_accuracy import prompt_accuracy

    images, prompts = fresh
    with pytest.raises(ValueError, match="images for"):
        prompt_accuracy(classifier, images[:3], prompts[:2])
    with pytest.raises(ValueError, match="not a shapes prompt"):
        prompt_accuracy(classifier, images[:1], ["a cat"])


def test_classifier_fid_floor_is_small_and_generated_garbage_is_far(classifier):
    from deploykit.eval.prompt_accuracy import classifier_fid, fid_reference, render_prompts

    prompts = shapes.evaluation_prompts(100, seed=1)
    reference = fid_reference(classifier, prompts)
    noise = torch.rand(len(prompts), 3, 64, 64) * 2 - 1
    assert reference["floor"] < classifier_fid(classifier, noise, reference) / 20
    assert np.isclose(classifier_fid(classifier, render_prompts(prompts, 77), reference), reference["floor"], rtol=1.0)


# ---- the shipped teacher ------------------------------------------------------------------------

def test_the_shipped_teacher_is_a_small_sd_pipeline():
    from diffusers import StableDiffusionPipeline

    files = [p for p in SHIPPED.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 25_000_000
    assert not [p for p in files if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl")]
    pipe = StableDiffusionPipeline.from_pretrained(SHIPPED)
    assert type(pipe.text_encoder).__name__ == "CLIPTextModel" and type(pipe.vae).__name__ == "AutoencoderKL"
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
    entry = get_entry("shapes")
    assert {k: pipe.scheduler.config[k] for k in entry.scheduler} == entry.scheduler
    card = json.loads((SHIPPED / "card.json").read_text())
    # the shipped weights are what the registry's settings train: a changed setting needs a retrain
    assert card["settings"] == json.loads(json.dumps(entry.settings())) and card["configs"]["scheduler"] == entry.scheduler
    # what the shipped teacher guarantees: it follows its prompts far above chance, in colour and in position
    # (the first teacher ignored position: docs/text-to-image.md). The 90% target is a benchmark figure, not
    # a test, which is why the figure is reported per attribute.
    accuracy = card["teacher_prompt_accuracy"]
    assert accuracy["accuracy"] >= accuracy["shuffled_prompts"] + 0.4 and accuracy["shuffled_prompts"] < 0.35
    assert accuracy["trained"]["per_attribute"]["colour"] >= 0.95
    assert accuracy["trained"]["per_attribute"]["position"] >= 0.9


# ---- training the test-size teacher --------------------------------------------------------------

def test_a_high_noise_share_draws_that_share_of_timesteps_from_the_noisiest_ones():
    from deploykit.zoo.registry import PipelineTraining
    from deploykit.zoo.train_pipeline import _timesteps

    uniform = PipelineTraining(batch_size=20000)
    # off, the draw is the plain uniform one: a teacher trained before the setting existed retrains identically
    assert torch.equal(_timesteps(1000, uniform, torch.Generator().manual_seed(0)),
                       torch.randint(0, 1000, (20000,), generator=torch.Generator().manual_seed(0)))
    t = _timesteps(1000, PipelineTraining(batch_size=20000, high_noise_share=0.3, high_noise_from=850),
                   torch.Generator().manual_seed(0))
    assert t.min() >= 0 and t.max() <= 999
    # 30% redrawn from [850, 1000) plus the 15% of the uniform 70% that land there anyway
    assert abs(float((t >= 850).float().mean()) - (0.3 + 0.7 * 0.15)) < 0.015
    everything = _timesteps(1000, PipelineTraining(batch_size=500, high_noise_share=1.0, high_noise_from=900),
                            torch.Generator().manual_seed(1))
    assert everything.min() >= 900


def test_min_snr_weights_keep_the_noisiest_steps_for_v_prediction():
    from deploykit.zoo.train_pipeline import _min_snr_weights

    snr = torch.tensor([0.0, 1e-4, 1.0, 4.0, 99.0])
    v = _min_snr_weights(snr, 5.0, v_prediction=True)
    # a v loss is an x0 loss weighted SNR + 1: capped at gamma, the noisy end keeps its full weight
    assert torch.allclose(v, torch.tensor([1.0, 1.0, 1.0, 1.0, 5.0 / 100.0]))
    eps = _min_snr_weights(snr[1:], 5.0, v_prediction=False)
    assert torch.allclose(eps, torch.tensor([1.0, 1.0, 1.0, 5.0 / 99.0]))


def test_every_scheduler_rebuilt_from_a_zero_terminal_snr_config_keeps_that_schedule():
    from diffusers import DDPMScheduler

    from deploykit.runtime.sampling import make_pipeline_scheduler, make_scheduler
    from deploykit.stages.data import noise_scheduler
    from deploykit.zoo.registry import SD15_SCHEDULER

    # a teacher trained on Lin et al.'s schedule (benchmarks/results/shapes_retrain_zero_snr trained one)
    config = {**SD15_SCHEDULER, "prediction_type": "v_prediction", "rescale_betas_zero_snr": True,
              "timestep_spacing": "trailing"}
    trained = DDPMScheduler(**{k: v for k, v in config.items() if k != "set_alpha_to_one"})
    assert float(trained.alphas_cumprod[-1]) < 1e-6  # the teacher saw pure noise at t = 999
    # recovery noises samples with the schedule the teacher was trained on, not SD's un-rescaled one
    assert torch.equal(noise_scheduler({"scheduler_config": config}).alphas_cumprod, trained.alphas_cumprod)
    for sampler in (make_scheduler("ddim", config), make_pipeline_scheduler("ddim", config)):
        assert torch.equal(sampler.alphas_cumprod, trained.alphas_cumprod)
        sampler.set_timesteps(20)
        assert int(sampler.timesteps[0]) == 999  # trailing: sampling starts where the prompt alone decides


@pytest.fixture(scope="module")
def tiny_zoo(tmp_path_factory):
    zoo = tmp_path_factory.mktemp("zoo")
    env = {**__import__("os").environ, "DEPLOYKIT_ZOO_DIR": str(zoo)}
    subprocess.run([sys.executable, "-m", "deploykit.cli", "zoo", "train", "shapes-tiny"], env=env, check=True,
                   capture_output=True, timeout=600)
    return zoo


def test_zoo_train_writes_an_sd_pipeline_folder_that_loads_everywhere(tiny_zoo, monkeypatch):
    from diffusers import StableDiffusionPipeline

    from deploykit.models import load_teacher
    from deploykit.models.teacher import check_teacher_spec, teacher_kind

    folder = tiny_zoo / "shapes-tiny"
    assert {p.name for p in folder.iterdir()} == {"model_index.json", "unet", "vae", "text_encoder", "tokenizer",
                                                 "scheduler", "card.json", "attributes.safetensors",
                                                 "fid_reference.safetensors"}
    card = json.loads((folder / "card.json").read_text())
    entry = get_entry("shapes-tiny")
    assert card["settings"]["teacher"]["steps"] == entry.teacher.steps and card["command"] == "deploykit zoo train shapes-tiny"
    assert set(card["time"]["parts"]) >= {"classifier", "vae", "text_encoder_unet"}
    assert card["device"] and card["configs"]["scheduler"] == entry.scheduler
    pipe = StableDiffusionPipeline.from_pretrained(folder)
    assert pipe.safety_checker is None and pipe.vae.config.scaling_factor == card["configs"]["vae"]["scaling_factor"]
    assert {k: pipe.scheduler.config[k] for k in entry.scheduler} == entry.scheduler  # the registry's schedule ships
    image = pipe("one small red circle in the center", num_inference_steps=2, height=64, width=64, output_type="np").images
    assert image.shape == (1, 64, 64, 3) and np.isfinite(image).all()

    monkeypatch.setenv("DEPLOYKIT_ZOO_DIR", str(tiny_zoo))
    assert teacher_kind("zoo:shapes-tiny") == "pipeline" and teacher_kind("zoo:digits-tiny") == "pixel"
    check_teacher_spec("zoo:shapes-tiny")
    teacher = load_teacher("zoo:shapes-tiny")
    assert teacher.kind == "sd" and teacher.sample_shape == (4, 16, 16) and teacher.dataset == "shapes"
    assert next(teacher.model.parameters()).dtype == torch.float32  # shipped in fp16, run in fp32


def test_an_untrained_zoo_pipeline_is_one_clear_input_error(tmp_path, monkeypatch):
    from deploykit.errors import InputError
    from deploykit.models.teacher import check_teacher_spec

    monkeypatch.setenv("DEPLOYKIT_ZOO_DIR", str(tmp_path))
    with pytest.raises(InputError, match="deploykit zoo train shapes-tiny"):
        check_teacher_spec("zoo:shapes-tiny")


@pytest.mark.parametrize("name, device, message", [
    ("digits-tiny", "cuda", "trains on the CPU only"),
    ("shapes-tiny", "tpu", "--device tpu: not available here"),
])
def test_zoo_train_refuses_a_device_it_cannot_use(tmp_path, name, device, message):
    out = subprocess.run([sys.executable, "-m", "deploykit.cli", "zoo", "train", name, "--device", device,
                          "--out", str(tmp_path / "z")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "z").exists()
