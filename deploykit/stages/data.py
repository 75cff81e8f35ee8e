"""Shared by the stages: the teacher's metadata, its data set and its FID features."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from deploykit.errors import InputError
from deploykit.io import load_tensors, read_text_file
from deploykit.stages.base import MAX_INPUT_FILE_BYTES

if TYPE_CHECKING:  # deploykit.eval imports torchmetrics, seconds that loading a recipe need not spend
    from deploykit.eval.features import DigitsClassifier

TEACHER_JSON = "teacher.json"
FEATURES = "features.safetensors"
PIPELINE_DIR = "pipeline"  # an SD teacher's other components (text encoders, VAE, tokenizers, scheduler)
DECODER_ROLE = "student.vae_decoder"  # the decoder stage's smaller VAE decoder for the student pipeline


def teacher_meta(teacher_dir: Path) -> dict:
    return json.loads((teacher_dir / TEACHER_JSON).read_text())


def training_images(meta: dict) -> torch.Tensor | None:
    """The clean images the teacher was trained on, where the teacher says which (zoo teachers)."""
    if meta.get("dataset") == "sklearn-digits":
        from deploykit.zoo.data import load_digits_images

        return load_digits_images(meta["sample_shape"][-1])[0]
    return None


def feature_extractor(teacher_dir: Path) -> DigitsClassifier | None:
    from deploykit.eval.features import DigitsClassifier

    path = teacher_dir / FEATURES
    if not path.is_file():
        return None
    model = DigitsClassifier()
    model.load_state_dict(load_tensors(path))
    return model.eval()


MAX_PROMPTS = 1_000_000


def read_prompts(path: Path) -> list[str]:
    """A prompt file: one prompt per line, blank lines skipped; a regular UTF-8 file of at most 16 MiB."""
    lines = read_text_file(path, MAX_INPUT_FILE_BYTES, "prompt file").splitlines()
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise InputError(f"prompt file {path} has no prompts (one per line)")
    if len(prompts) > MAX_PROMPTS:
        raise InputError(f"prompt file {path} has {len(prompts)} prompts; at most {MAX_PROMPTS} are read")
    return prompts


def is_pipeline(meta: dict) -> bool:
    return meta.get("kind", "pixel") in ("sd", "sdxl")


def example_inputs(meta: dict, model: torch.nn.Module, batch: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """One UNet call's inputs at the build's resolution, in the UNet's positional order."""
    from deploykit.models.inputs import example_unet_inputs

    return example_unet_inputs(model, batch, size=meta["sample_shape"][-1], seed=seed,
                               num_train_timesteps=meta["scheduler_config"]["num_train_timesteps"])


def load_teacher_pipeline(teacher_dir: Path, unet: torch.nn.Module):
    from deploykit.models.diffusers_pipelines import load_pipeline

    return load_pipeline(teacher_dir / PIPELINE_DIR, unet)


def noise_scheduler(meta: dict):
    from diffusers import DDPMScheduler

    from deploykit.runtime.sampling import trained_schedule

    return DDPMScheduler(**trained_schedule(meta["scheduler_config"]))
