"""Loading the dense teacher.

A teacher spec is one of: ``zoo:NAME`` (the project's own teachers: pixel-space UNets, and SD
pipelines such as ``zoo:shapes``), a local diffusers
folder (a UNet2DModel, or an SD / SDXL pipeline with ``model_index.json``), ``hf:ORG/NAME[@REVISION]``
(a hub pipeline; needs the network or the local hub cache), or ``random:TOPOLOGY`` (sd15, sdxl,
tiny-sd, tiny-sdxl built from config with random weights: for speed, never for quality).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from deploykit.errors import InputError
from deploykit.models.io_spec import vae_scale_factor

DEFAULT_SCHEDULER = {"num_train_timesteps": 1000, "beta_schedule": "linear", "prediction_type": "epsilon"}


@dataclass
class Teacher:
    model: nn.Module
    scheduler_config: dict
    sample_shape: tuple[int, int, int]  # (channels, height, width) of one sample
    source: str
    dataset: str | None = None  # the zoo data set it was trained on, when known
    info: dict = field(default_factory=dict)
    kind: str = "pixel"         # "pixel" (UNet2DModel), "sd" or "sdxl" (UNet2DConditionModel in a pipeline)
    pipeline: object = None     # the SD / SDXL pipeline around the UNet
    random_weights: bool = False


def random_weights_spec(spec: str, topology: str | None) -> str:
    """The ``random:`` spec standing in for ``spec`` under ``--random-weights``."""
    from deploykit.models.diffusers_pipelines import KNOWN_HUB_TOPOLOGIES

    if spec.startswith("random:"):
        return spec
    hub_id = spec.removeprefix("hf:").split("@")[0]
    topology = topology or KNOWN_HUB_TOPOLOGIES.get(hub_id)
    if topology is None:
        raise InputError(f"--random-weights: no topology known for teacher {spec}; set `topology:` in the recipe "
                         "(sd15, sdxl, tiny-sd, tiny-sdxl)")
    return f"random:{topology}"


def teacher_path(spec: str, base_dir: Path | None = None) -> Path:
    """Where a teacher's files are: the zoo folder, or a local path (relative to ``base_dir``)."""
    if spec.startswith("zoo:"):
        from deploykit.zoo import get_entry

        try:
            return get_entry(spec.removeprefix("zoo:")).folder
        except KeyError as e:
            raise InputError(str(e.args[0])) from None
    path = Path(spec)
    return path if path.is_absolute() or base_dir is None else base_dir / path


def load_teacher(spec: str, base_dir: Path | None = None, resolution: int | None = None, seed: int = 0) -> Teacher:
    """Load ``spec``; ``resolution`` (image side in pixels) sets an SD teacher's latent sample shape."""
    if spec.startswith("zoo:"):
        if _is_zoo_pipeline(spec):
            return _load_zoo_pipeline(spec.removeprefix("zoo:"), resolution)
        return _load_zoo(spec.removeprefix("zoo:"))
    if spec.startswith("random:"):
        from deploykit.models.topologies import build_pipeline, topology

        name = spec.removeprefix("random:")
        return _pipeline_teacher(build_pipeline(name, seed), spec, resolution or topology(name)["image_size"],
                                 random_weights=True, topology=name)
    if spec.startswith("hf:"):
        from deploykit.models.diffusers_pipelines import load_pretrained_pipeline

        hub_id, _, revision = spec.removeprefix("hf:").partition("@")
        return _pipeline_teacher(load_pretrained_pipeline(hub_id, revision or None), spec, resolution)
    path = teacher_path(spec, base_dir)
    if (path / "model_index.json").is_file():
        from deploykit.models.diffusers_pipelines import load_pretrained_pipeline

        return _pipeline_teacher(load_pretrained_pipeline(path), spec, resolution)
    return _load_diffusers_folder(path, spec)


def check_teacher_spec(spec: str, base_dir: Path | None = None) -> None:
    """Fail fast on a teacher that cannot load, before anything is written."""
    if spec.startswith("zoo:"):
        _zoo_pipeline_folder(spec.removeprefix("zoo:")) if _is_zoo_pipeline(spec) else _zoo_files(spec.removeprefix("zoo:"))
    elif spec.startswith("random:"):
        from deploykit.models.topologies import topology

        try:
            topology(spec.removeprefix("random:"))
        except KeyError as e:
            raise InputError(str(e.args[0])) from None
    elif spec.startswith("hf:"):
        hub_id = spec.removeprefix("hf:").partition("@")[0]
        if hub_id.count("/") != 1 or not all(hub_id.split("/")):
            raise InputError(f"teacher {spec}: a hub id is hf:ORG/NAME[@REVISION]")
    else:
        path = teacher_path(spec, base_dir)
        if (path / "model_index.json").is_file():
            from deploykit.models.diffusers_pipelines import pipeline_class, pipeline_class_of

            pipeline_class(pipeline_class_of(path))
        else:
            _unet_folder(path, spec)


def teacher_kind(spec: str, base_dir: Path | None = None) -> str:
    """"pixel" or "pipeline", known from the spec alone (no weights loaded)."""
    if spec.startswith(("random:", "hf:")):
        return "pipeline"
    if spec.startswith("zoo:"):
        return "pipeline" if _is_zoo_pipeline(spec) else "pixel"
    return "pipeline" if (teacher_path(spec, base_dir) / "model_index.json").is_file() else "pixel"


def _pipeline_teacher(pipe, spec: str, resolution: int | None, random_weights: bool = False,
                      topology: str | None = None) -> Teacher:
    from deploykit.models.diffusers_pipelines import PIPELINE_KINDS

    unet = pipe.unet.eval()
    c = unet.config
    scale = vae_scale_factor(pipe.vae.config)
    default = (c.sample_size if isinstance(c.sample_size, int) else c.sample_size[0]) * scale
    resolution = resolution or default
    if resolution % (scale * 8):
        raise InputError(f"resolution {resolution} is not a multiple of {scale * 8} (the VAE's factor {scale} times 8)")
    scheduler = {k: v for k, v in dict(pipe.scheduler.config).items() if not k.startswith("_")}
    info = {"resolution": resolution, "vae_scale_factor": scale, "pipeline_class": type(pipe).__name__}
    if topology:
        info["topology"] = topology
    return Teacher(unet, scheduler, (c.in_channels, resolution // scale, resolution // scale), source=spec, info=info,
                   kind=PIPELINE_KINDS[type(pipe).__name__], pipeline=pipe, random_weights=random_weights)


def _zoo_files(name: str) -> tuple[Path, Path, dict]:
    from deploykit.zoo import get_entry

    try:
        entry = get_entry(name)
    except KeyError as e:
        raise InputError(str(e.args[0])) from None
    weights, config, card = (entry.folder / f for f in ("unet.safetensors", "unet_config.json", "card.json"))
    if not all(p.is_file() for p in (weights, config, card)):
        raise InputError(f"zoo teacher {name!r} has no weights at {entry.folder}; "
                         f"train it with `deploykit zoo train {name}`")
    return weights, config, json.loads(card.read_text())


def _is_zoo_pipeline(spec: str) -> bool:
    from deploykit.zoo import get_entry

    try:
        return get_entry(spec.removeprefix("zoo:")).kind != "pixel"
    except KeyError as e:
        raise InputError(str(e.args[0])) from None


def _zoo_pipeline_folder(name: str) -> Path:
    from deploykit.zoo import get_entry

    folder = get_entry(name).folder
    if not (folder / "model_index.json").is_file() or not (folder / "card.json").is_file():
        raise InputError(f"zoo teacher {name!r} has no weights at {folder}; train it with `deploykit zoo train {name}`")
    return folder


def _load_zoo_pipeline(name: str, resolution: int | None) -> Teacher:
    """A zoo SD pipeline: shipped in fp16 to stay small, run in fp32 like every other teacher."""
    import torch

    from deploykit.models.diffusers_pipelines import load_pretrained_pipeline
    from deploykit.zoo import get_entry

    folder = _zoo_pipeline_folder(name)
    pipe = load_pretrained_pipeline(folder).to(torch.float32)
    teacher = _pipeline_teacher(pipe, f"zoo:{name}", resolution)
    teacher.dataset = get_entry(name).dataset
    teacher.info["zoo_card"] = json.loads((folder / "card.json").read_text())
    return teacher


def _load_zoo(name: str) -> Teacher:
    from diffusers import UNet2DModel

    from deploykit.io import load_tensors
    from deploykit.zoo import get_entry

    weights, config, card = _zoo_files(name)
    entry = get_entry(name)
    model = UNet2DModel.from_config(json.loads(config.read_text()))
    model.load_state_dict({k: v.float() for k, v in load_tensors(weights).items()})
    train = card["settings"]["teacher"]
    scheduler = {**DEFAULT_SCHEDULER, "num_train_timesteps": train["num_train_timesteps"],
                 "beta_schedule": train["beta_schedule"]}
    c = model.config
    return Teacher(model.eval(), scheduler, (c.in_channels, c.sample_size, c.sample_size),
                   source=f"zoo:{name}", dataset=entry.dataset, info={"zoo_card": card})


def _unet_folder(path: Path, spec: str) -> Path:
    if not path.exists():
        raise InputError(f"teacher path does not exist: {spec} (looked at {path})")
    for candidate in (path, path / "unet"):
        if (candidate / "config.json").is_file():
            return candidate
    raise InputError(f"teacher {spec}: no diffusers model here (expected config.json in {path} or {path / 'unet'})")


def _load_diffusers_folder(path: Path, spec: str) -> Teacher:
    import diffusers

    folder = _unet_folder(path, spec)
    cls_name = json.loads((folder / "config.json").read_text()).get("_class_name", "UNet2DModel")
    if cls_name != "UNet2DModel":
        raise InputError(f"teacher {spec}: {cls_name} is not supported yet (UNet2DModel is)")
    model = diffusers.UNet2DModel.from_pretrained(folder, use_safetensors=True)
    scheduler_file = path / "scheduler" / "scheduler_config.json"
    scheduler = dict(DEFAULT_SCHEDULER)
    if scheduler_file.is_file():
        loaded = json.loads(scheduler_file.read_text())
        scheduler.update({k: loaded[k] for k in ("num_train_timesteps", "beta_schedule", "beta_start", "beta_end",
                                                 "prediction_type") if k in loaded})
    c = model.config
    size = c.sample_size if isinstance(c.sample_size, int) else c.sample_size[0]
    return Teacher(model.eval(), scheduler, (c.in_channels, size, size), source=str(spec))
