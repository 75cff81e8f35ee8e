"""Recipes: what to build, validated on load.

A recipe names a teacher, a target and an ordered list of stages. The ``stages:`` entries are the
settings models of the registered stages (:mod:`deploykit.stages`), told apart by ``stage:``; their
order is the registry's, and a stage that reads a role needs an earlier stage that writes it. An
unknown key, a wrong type or a value out of range is reported with the key's path and the file,
before anything is written.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import Field, ValidationError, create_model, field_validator, model_validator

from deploykit.errors import InputError
from deploykit.stages import STAGES, StageSpec
from deploykit.stages.base import StageConfig, StrictModel
from deploykit.targets import Target

Topology = Literal["sd15", "sdxl", "tiny-sd", "tiny-sdxl"]


def _listed(stages: dict[str, StageSpec]) -> list[StageSpec]:
    """The stages a recipe may list: every registered one but the implicit (teacher)."""
    return [s for s in stages.values() if not s.implicit]


def _one_of(names: list[str]) -> str:
    """'a prune or sparsify', 'an export'."""
    joined = names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"
    return f"{'an' if joined[0] in 'aeiou' else 'a'} {joined}"


def _check_reads(names: list[str]) -> None:
    """Each stage's roles come from a stage before it (the implicit stages come before all)."""
    written = set().union(*(s.provides() for s in STAGES.values() if s.implicit))
    for name in names:
        spec = STAGES[name]
        for role in spec.reads:
            if role not in written:
                # the stages that can start it: those writing it without needing it first
                writers = [s.name for s in _listed(STAGES) if role in s.provides() and role not in s.reads]
                if not writers:
                    raise ValueError(f"{name} reads {role}, which no registered stage writes")
                raise ValueError(f"{name} reads {role}, which no stage before it writes: add {_one_of(writers)} stage "
                                 "before it")
        written |= spec.provides()


class Recipe(StrictModel):
    """A deploykit build: ``deploykit build RECIPE``."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    teacher: str = Field(description="zoo:NAME, hf:ORG/NAME[@REVISION], random:TOPOLOGY, or a local diffusers "
                                     "folder (relative to the recipe file)")
    topology: Topology | None = Field(None, description="the teacher's architecture, for --random-weights")
    resolution: int | None = Field(None, ge=8, le=4096, description="SD: image side in pixels (default: the model's)")
    target: Target = "cpu"
    seed: int = Field(0, ge=0)
    # (validated against the registered stages' settings: see recipe_model)
    stages: list[StageConfig] = Field(min_length=1)

    @field_validator("stages")
    @classmethod
    def _order(cls, stages: list) -> list:
        names = [s.stage for s in stages]
        if len(set(names)) != len(names):
            raise ValueError(f"a stage appears twice: {names}")
        order = list(STAGES)
        if names != sorted(names, key=order.index):
            raise ValueError(f"stages must run in the order {' -> '.join(n for n in order if n in names)}")
        _check_reads(names)
        return stages

    @model_validator(mode="after")
    def _fit(self):
        """Each stage's settings against the rest of the recipe, then the stages the recipe needs and lacks."""
        listed = {s.stage: s for s in self.stages}
        try:
            for name, config in listed.items():
                if STAGES[name].check is not None:
                    STAGES[name].check(config, self)
            for spec in _listed(STAGES):
                reason = spec.required(self) if spec.required is not None and spec.name not in listed else None
                if reason:
                    raise ValueError(reason)
        except ValueError as e:
            raise ValueError(f"stages: {e}") from None
        return self

    def stage(self, name: str):
        """The listed stage ``name``'s settings, as written in the recipe; None if it is not listed."""
        return next((s for s in self.stages if s.stage == name), None)

    def plan(self) -> list[tuple[StageSpec, Any]]:
        """Every stage the build runs, in order, with its settings resolved against the recipe: the implicit
        stages made from the recipe's own fields, and defaults that depend on the target filled in."""
        out = []
        for spec in STAGES.values():
            config = self.stage(spec.name)
            if config is None and not spec.implicit:
                continue
            out.append((spec, spec.resolve(config, self) if spec.resolve is not None else config))
        return out


_MODELS: dict[tuple, type[Recipe]] = {}


def recipe_model() -> type[Recipe]:
    """The recipe model over the stages registered now: ``stages:`` entries are told apart by ``stage:``."""
    key = tuple(map(id, STAGES.values()))
    if key not in _MODELS:
        configs = tuple(spec.config for spec in _listed(STAGES))
        entry = Annotated[Union[configs], Field(discriminator="stage")]  # noqa: UP007 (a runtime tuple of types)
        _MODELS[key] = create_model("Recipe", __base__=Recipe, __doc__=Recipe.__doc__,
                                    stages=(list[entry], Field(min_length=1)))
    return _MODELS[key]


def _format_errors(err: ValidationError, path: Path | str) -> str:
    lines = []
    for e in err.errors():
        loc = list(e["loc"])
        # "stages.0.prune.criterion" reads better as "stages[0] (prune).criterion"
        parts: list[str] = []
        i = 0
        while i < len(loc):
            item = loc[i]
            if isinstance(item, int):
                parts[-1] = f"{parts[-1]}[{item}]"
                if i + 1 < len(loc) and loc[i + 1] in STAGES:
                    i += 1
            else:
                parts.append(str(item))
            i += 1
        key = ".".join(parts) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        lines.append(f"{path}: {key}: {msg}")
    return "\n".join(lines)


def apply_overrides(data: dict, overrides: Sequence[str], path: Path) -> dict:
    """``KEY=VALUE`` settings from the command line (``deploykit build --set``) put into the recipe as loaded.

    KEY is a top-level field (``resolution``) or a listed stage's field (``prune.round_to``,
    ``bench.end_to_end.steps``); VALUE is read as YAML (``4``, ``true``, ``[a, b]``, ``null``). The result is
    validated like the file itself, so a wrong key or value is the same one message.
    """
    stage_names = {spec.name for spec in _listed(STAGES)}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise InputError(f"--set {item}: expected KEY=VALUE, e.g. --set prune.round_to=4")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            raise InputError(f"--set {item}: the value is not valid YAML: {e}") from None
        parts = key.strip().split(".")
        target: Any = data
        if parts[0] in stage_names:
            target = next((s for s in data.get("stages") or [] if isinstance(s, dict) and s.get("stage") == parts[0]), None)
            if target is None:
                raise InputError(f"--set {key}: {path} has no {parts[0]} stage to set it in")
            parts = parts[1:]
        elif parts[0] == "stages":
            raise InputError(f"--set {key}: set a stage's field by the stage's name, e.g. --set prune.round_to=4")
        if not parts or not all(parts):
            raise InputError(f"--set {key}: name a field, e.g. --set prune.round_to=4")
        for part in parts[:-1]:
            target = target.setdefault(part, {})
            if not isinstance(target, dict):
                raise InputError(f"--set {key}: {part} is not a mapping in {path}")
        target[parts[-1]] = value
    return data


def load_recipe(path: str | Path, overrides: Sequence[str] = ()) -> Recipe:
    """The recipe at ``path``, with ``overrides`` (``KEY=VALUE``, see :func:`apply_overrides`) applied."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"recipe not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise InputError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: a recipe is a mapping of keys (name, teacher, stages, ...)")
    data = apply_overrides(data, overrides, path)
    where = f"{path} (with --set {', '.join(overrides)})" if overrides else path
    try:
        return recipe_model().model_validate(data)
    except ValidationError as e:
        raise InputError(_format_errors(e, where)) from None


def json_schema() -> dict:
    return recipe_model().model_json_schema()
