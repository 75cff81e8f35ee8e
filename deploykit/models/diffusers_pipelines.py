"""diffusers' Stable Diffusion pipelines around a UNet: loading them, and keeping their other components.

The UNet is what deploykit prunes; the text encoders, VAE, tokenizers and scheduler travel with it
unchanged. They are saved once, beside the teacher, as a diffusers folder with no UNet, and any UNet
(teacher or pruned student) is put back into that folder's pipeline when one is needed.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from torch import nn

from deploykit.errors import InputError

# The pipeline classes a folder or hub id may name: nothing else is imported by name from user files.
PIPELINE_KINDS = {"StableDiffusionPipeline": "sd", "StableDiffusionXLPipeline": "sdxl"}
# Hub ids whose architecture we can build offline, for --random-weights.
KNOWN_HUB_TOPOLOGIES = {
    "stable-diffusion-v1-5/stable-diffusion-v1-5": "sd15",
    "runwayml/stable-diffusion-v1-5": "sd15",
    "stabilityai/stable-diffusion-xl-base-1.0": "sdxl",
}


def pipeline_class(name: str):
    import diffusers

    if name not in PIPELINE_KINDS:
        raise InputError(f"pipeline class {name!r} is not supported (supported: {', '.join(PIPELINE_KINDS)})")
    return getattr(diffusers, name)


def pipeline_class_of(folder: Path) -> str:
    index = folder / "model_index.json"
    try:
        return json.loads(index.read_text())["_class_name"]
    except (OSError, json.JSONDecodeError, KeyError) as e:
        raise InputError(f"{index}: not a diffusers pipeline index ({e})") from None


def load_pretrained_pipeline(source: str | Path, revision: str | None = None):
    """A pretrained SD / SDXL pipeline from a local folder or a hub id, safetensors only."""
    import diffusers

    try:
        with _quiet():
            pipe = diffusers.DiffusionPipeline.from_pretrained(source, revision=revision, use_safetensors=True)
    except (OSError, ValueError, EnvironmentError) as e:
        raise InputError(f"could not load a diffusers pipeline from {source}: {e}") from None
    pipeline_class(type(pipe).__name__)  # refuse kinds we do not handle
    return pipe


@contextmanager
def _quiet() -> Iterator[None]:
    """diffusers' own progress bars and notices would interleave with deploykit's progress display."""
    from diffusers.utils import logging as diffusers_logging

    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        diffusers_logging.set_verbosity(level)
        diffusers_logging.enable_progress_bar()


def save_components(pipe, folder: Path) -> None:
    """Save every component but the UNet (saved on its own, possibly pruned)."""
    unet = pipe.unet
    pipe.register_modules(unet=None)
    try:
        with _quiet():
            pipe.save_pretrained(folder, safe_serialization=True)
    finally:
        pipe.register_modules(unet=unet)


def load_pipeline(folder: Path, unet: nn.Module):
    """The pipeline saved by :func:`save_components`, with ``unet`` in it."""
    cls = pipeline_class(pipeline_class_of(folder))
    with _quiet():
        pipe = cls.from_pretrained(folder, unet=unet, use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe
