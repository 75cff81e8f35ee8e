"""Loading the dense teacher: ``zoo:NAME`` or a local diffusers folder."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from deploykit.errors import InputError

DEFAULT_SCHEDULER = {"num_train_timesteps": 1000, "beta_schedule": "linear", "prediction_type": "epsilon"}


@dataclass
class Teacher:
    model: nn.Module
    scheduler_config: dict
    sample_shape: tuple[int, int, int]  # (channels, height, width) of one sample
    source: str
    dataset: str | None = None  # the zoo data set it was trained on, when known
    info: dict = field(default_factory=dict)


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


def load_teacher(spec: str, base_dir: Path | None = None) -> Teacher:
    if spec.startswith("zoo:"):
        return _load_zoo(spec.removeprefix("zoo:"))
    return _load_diffusers_folder(teacher_path(spec, base_dir), spec)


def check_teacher_spec(spec: str, base_dir: Path | None = None) -> None:
    """Fail fast on a teacher that cannot load, before anything is written."""
    if spec.startswith("zoo:"):
        _zoo_files(spec.removeprefix("zoo:"))
    else:
        _unet_folder(teacher_path(spec, base_dir), spec)


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
