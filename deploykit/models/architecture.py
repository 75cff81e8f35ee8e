"""Save a (possibly pruned) diffusers model without pickle, and rebuild it.

A pruned model no longer matches its diffusers config, and torch-pruning's own state-dict loader
does not handle diffusers UNets. We store the config the model was built from plus the shape of
every layer whose shape the config does not give (``architecture.json``), and the weights as
safetensors. Rebuilding constructs the model from its config, resizes the recorded layers in place,
sets every attention's head count, re-syncs diffusers' attributes and loads the weights strictly.

The description holds no path: ``config`` must be an object, because diffusers' ``from_config`` reads
a string there as a folder or hub id to load another config from (outside the artifact, or over the
network), and the files are found by their fixed names beside it, never through a symlink leading out.

Format 2 records each ``Attention``'s head count (``attention``): after head pruning it cannot be
read off the shapes. Format 1 files (no head counts) still load, with the rule that wrote them.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from deploykit.errors import InputError
from deploykit.io import atomic_write_json, load_tensors, save_tensors
from deploykit.models.sync import sync_diffusers_attributes
from deploykit.paths import OutsideFolder, inside


def _attention_modules(model: nn.Module) -> dict[str, nn.Module]:
    from diffusers.models.attention_processor import Attention

    return {name: m for name, m in model.named_modules() if isinstance(m, Attention)}

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
WEIGHTS_NAME = "model.safetensors"
ARCH_NAME = "architecture.json"

_MODEL_CLASSES = ("UNet2DModel", "UNet2DConditionModel")


def _model_class(name: str) -> type[nn.Module]:
    if name not in _MODEL_CLASSES:
        raise InputError(f"unsupported model class {name!r} (supported: {', '.join(_MODEL_CLASSES)})")
    import diffusers

    return getattr(diffusers, name)


def _layer_spec(module: nn.Module) -> dict | None:
    if isinstance(module, nn.Conv2d):
        return {"type": "Conv2d", "in_channels": module.in_channels, "out_channels": module.out_channels,
                "groups": module.groups}
    if isinstance(module, nn.Linear):
        return {"type": "Linear", "in_features": module.in_features, "out_features": module.out_features}
    if isinstance(module, nn.GroupNorm):
        return {"type": "GroupNorm", "num_groups": module.num_groups, "num_channels": module.num_channels}
    if isinstance(module, nn.LayerNorm):
        return {"type": "LayerNorm", "normalized_shape": list(module.normalized_shape)}
    return None


def describe(model: nn.Module) -> dict:
    """The architecture description: class, config and the shape of every resizable layer."""
    layers = {name: spec for name, m in model.named_modules() if (spec := _layer_spec(m)) is not None}
    return {
        "format_version": FORMAT_VERSION,
        "class": type(model).__name__,
        "config": {k: v for k, v in dict(model.config).items() if not k.startswith("_")},
        "layers": layers,
        "attention": {name: {"heads": m.heads} for name, m in _attention_modules(model).items()},
    }


def _resize(module: nn.Module, spec: dict) -> None:
    """Give ``module`` the recorded shape; weights are placeholders until the state dict loads."""
    def fresh(*shape: int) -> nn.Parameter:
        return nn.Parameter(torch.empty(*shape))

    kind = spec["type"]
    if kind == "Conv2d":
        assert isinstance(module, nn.Conv2d)
        module.in_channels, module.out_channels, module.groups = spec["in_channels"], spec["out_channels"], spec["groups"]
        module.weight = fresh(module.out_channels, module.in_channels // module.groups, *module.kernel_size)
        if module.bias is not None:
            module.bias = fresh(module.out_channels)
    elif kind == "Linear":
        assert isinstance(module, nn.Linear)
        module.in_features, module.out_features = spec["in_features"], spec["out_features"]
        module.weight = fresh(module.out_features, module.in_features)
        if module.bias is not None:
            module.bias = fresh(module.out_features)
    elif kind == "GroupNorm":
        assert isinstance(module, nn.GroupNorm)
        module.num_groups, module.num_channels = spec["num_groups"], spec["num_channels"]
        if module.affine:
            module.weight, module.bias = fresh(module.num_channels), fresh(module.num_channels)
    elif kind == "LayerNorm":
        assert isinstance(module, nn.LayerNorm)
        module.normalized_shape = tuple(spec["normalized_shape"])
        if module.elementwise_affine:
            module.weight = fresh(*module.normalized_shape)
            if module.bias is not None:
                module.bias = fresh(*module.normalized_shape)


def check_architecture(arch: object, where: str = ARCH_NAME) -> dict:
    """``arch`` if it has the shape :func:`describe` writes; an InputError naming ``where`` and the entry if not."""
    def refuse(entry: str, why: str) -> None:
        raise InputError(f"{where}: {entry}: {why}")

    if not isinstance(arch, dict):
        refuse("the description", "must be a JSON object")
    if not isinstance(arch.get("class"), str):
        refuse("class", "must be a string")
    if not isinstance(arch.get("config"), dict):
        refuse("config", f"must be a JSON object, not {type(arch.get('config')).__name__} "
                         f"{str(arch.get('config'))[:80]!r} (diffusers would read a string as a path to load)")
    for entry in ("layers", "attention"):
        table = arch.get(entry, {})
        if not isinstance(table, dict) or not all(isinstance(v, dict) for v in table.values()):
            refuse(entry, "must be an object of module name: object entries")
    return arch


def read_architecture(path: Path, shown_as: str | None = None) -> dict:
    """The checked description in ``path``; messages name the file as ``shown_as`` (default: its path)."""
    where = shown_as or str(path)
    try:
        arch = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{where}: not readable JSON ({e})") from None
    return check_architecture(arch, where)


def build(arch: dict) -> nn.Module:
    """Construct the model an architecture description names, with its recorded layer shapes."""
    check_architecture(arch)
    version = arch.get("format_version")
    if version not in READABLE_VERSIONS:
        raise InputError(f"architecture format {version!r} is not one of {', '.join(map(str, READABLE_VERSIONS))}")
    model = _model_class(arch["class"]).from_config(arch["config"])
    modules = dict(model.named_modules())
    attention = _attention_modules(model)
    head_dims = {name: m.inner_dim // m.heads for name, m in attention.items()}  # as built from the config
    for name, spec in arch["layers"].items():
        if name not in modules:
            raise InputError(f"architecture names a layer the model does not have: {name}")
        if _layer_spec(modules[name]) != spec:
            _resize(modules[name], spec)
    if version == 1:
        # format 1's rule: a multi-head width that divides by the old head width lost whole heads
        heads = {name: (m.to_q.out_features // head_dims[name]
                        if m.heads > 1 and m.to_q.out_features % head_dims[name] == 0 else m.heads)
                 for name, m in attention.items()}
    else:
        recorded = arch.get("attention", {})
        unknown = sorted(set(recorded) - set(attention))
        if unknown:
            raise InputError(f"architecture names an attention the model does not have: {unknown[0]}")
        try:
            heads = {name: int(spec["heads"]) for name, spec in recorded.items()}
        except (KeyError, TypeError, ValueError):
            raise InputError("architecture: every attention entry needs an integer 'heads'") from None
    try:
        sync_diffusers_attributes(model, heads=heads)
    except ValueError as e:
        raise InputError(f"architecture does not fit together: {e}") from None
    return model


def save_model(model: nn.Module, folder: str | Path) -> None:
    folder = Path(folder)
    save_tensors(folder / WEIGHTS_NAME, model.state_dict(), metadata={"format": "pt"})
    atomic_write_json(folder / ARCH_NAME, describe(model))


def load_model(folder: str | Path) -> nn.Module:
    folder = Path(folder)
    arch_path, weights_path = folder / ARCH_NAME, folder / WEIGHTS_NAME
    for p in (arch_path, weights_path):
        try:
            inside(folder, p.name)
        except OutsideFolder as e:
            raise InputError(f"{folder}: {e}") from None
        if not p.is_file():
            raise InputError(f"not a deploykit model folder: {p} is missing")
    arch = read_architecture(arch_path)
    # Built on the meta device and given the loaded tensors (assign=True): no random initialisation
    # to overwrite, and the weights are held once, not twice (SDXL's UNet: 10 GB, not 20)
    with torch.device("meta"):
        model = build(arch)
    state = {k: v.float() for k, v in load_tensors(weights_path).items()}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as e:  # shape mismatch
        raise InputError(f"{weights_path}: weights do not fit {arch_path}: {str(e).splitlines()[-1].strip()}") from None
    if missing or unexpected:
        raise InputError(f"{weights_path}: weights do not match {arch_path} "
                         f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})")
    unset = [name for name, t in model.named_buffers() if t.is_meta]
    if unset:  # buffers outside the state dict have no stored value: build those models the slow way
        model = build(arch)
        model.load_state_dict(state)
    return model.eval()
