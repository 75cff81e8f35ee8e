"""Recipes: what to build, validated on load.

A recipe names a teacher, a target and an ordered list of stages. The ``stages:`` entries are the
settings models of the registered stages (:mod:`deploykit.stages`), told apart by ``stage:``; their
order is the registry's, and a stage that reads a role needs an earlier stage that writes it. An
unknown key, a wrong type or a value out of range is reported with the key's path and the file,
before anything is written.
"""

from __future__ import annotations

import os
import re
from collections.abc import Hashable, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import Field, ValidationError, create_model, field_validator, model_validator

from deploykit.errors import InputError
from deploykit.io import read_text_file
from deploykit.paths import OutsideFolder, inside
from deploykit.stages import STAGES, StageSpec
from deploykit.stages.base import MAX_INPUT_FILE_BYTES, StageConfig, StrictModel
from deploykit.stages.bounds import Seed, Side
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
    resolution: Side | None = Field(None, description="SD: image side in pixels (default: the model's)")
    target: Target = "cpu"
    seed: Seed = 0
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


MAX_RECIPE_BYTES = 1 << 20
# A recipe written out is at most MAX_RECIPE_BYTES; YAML aliases can repeat an anchor without limit (a
# "billion laughs": ten aliases of ten aliases of ... of a long string). Values plus characters, counted with
# every alias expanded, stay under this, and containers nest at most MAX_DEPTH deep (a recipe needs 5).
MAX_EXPANDED = 4 * MAX_RECIPE_BYTES
MAX_DEPTH = 32
MAX_ERRORS = 20  # validation errors listed; the rest are counted
_PLAIN_KEY = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class _RecipeLoader(yaml.SafeLoader):
    """``yaml.safe_load``'s loader, refusing a key given twice in one mapping (YAML keeps the last one silently,
    so a recipe would not do what one of its lines says)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: set = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base`, whose keys the mapping may override
                    continue
                key = self.construct_object(key_node, deep=True)
                if isinstance(key, Hashable):
                    if key in seen:
                        raise yaml.constructor.ConstructorError("while constructing a mapping", node.start_mark,
                                                                f"found duplicate key {key!r}", key_node.start_mark)
                    seen.add(key)
        return super().construct_mapping(node, deep)


def _check_expanded_size(data: Any, path: Path) -> None:
    """Refuse a structure that aliases blow up, or that nests deeper than any recipe does (counted without recursion:
    a self-referencing alias is a structure that nests forever)."""
    left, stack = MAX_EXPANDED, [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise InputError(f"{path}: nested deeper than {MAX_DEPTH} levels")
        left -= 1 + (len(value) if isinstance(value, (str, bytes)) else 0)
        if left < 0:
            raise InputError(f"{path}: expands to more than {MAX_EXPANDED} values and characters with its YAML aliases "
                             "expanded; write the recipe out")
        if isinstance(value, dict):
            stack.extend((item, depth + 1) for pair in value.items() for item in pair)
        elif isinstance(value, (list, tuple, set)):
            stack.extend((item, depth + 1) for item in value)


def parse_recipe(text: str, path: Path) -> dict:
    """The recipe's YAML as a mapping; InputError for anything else."""
    try:
        data = yaml.load(text, Loader=_RecipeLoader)  # noqa: S506 (a SafeLoader)
    # ValueError: a scalar YAML resolves that Python cannot build (a 5000-digit integer, the date 2024-13-45)
    except (yaml.YAMLError, ValueError) as e:
        raise InputError(f"{path}: not valid YAML: {e}") from None
    except RecursionError:
        raise InputError(f"{path}: nested deeper than {MAX_DEPTH} levels") from None
    _check_expanded_size(data, path)
    if not isinstance(data, dict):
        raise InputError(f"{path}: a recipe is a mapping of keys (name, teacher, stages, ...)")
    return data


def _key_part(item: Any) -> str:
    """A key of the recipe as the messages show it: plain keys as written, anything else quoted and cut short."""
    if isinstance(item, str) and _PLAIN_KEY.match(item):
        return item
    text = repr(item)
    return text if len(text) <= 60 else f"{text[:57]}..."


def _format_errors(err: ValidationError, path: Path | str) -> str:
    lines = []
    errors = err.errors()
    for e in errors[:MAX_ERRORS]:
        loc = list(e["loc"])
        # "stages.0.prune.criterion" reads better as "stages[0] (prune).criterion"
        parts: list[str] = []
        i = 0
        while i < len(loc):
            item = loc[i]
            if isinstance(item, int) and not isinstance(item, bool) and parts:
                parts[-1] = f"{parts[-1]}[{item}]"
                if i + 1 < len(loc) and loc[i + 1] in STAGES:
                    i += 1
            else:
                parts.append(_key_part(item))
            i += 1
        key = ".".join(parts) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        lines.append(f"{path}: {key}: {msg}")
    if len(errors) > MAX_ERRORS:
        lines.append(f"{path}: ... and {len(errors) - MAX_ERRORS} more")
    return "\n".join(lines)


def input_file(recipe_dir: Path, value: str, allowed: Sequence[Path] = ()) -> Path:
    """The file a recipe field names (relative to the recipe): inside the recipe's folder, symlinks followed, or
    inside one of the ``allowed`` folders (``--allow-path``). Raises OutsideFolder otherwise."""
    try:
        return inside(recipe_dir, value)
    except OutsideFolder:
        if not allowed or "\x00" in value:
            raise
        path = recipe_dir / value
        real = Path(os.path.realpath(path))
        if any(real.is_relative_to(os.path.realpath(folder)) for folder in allowed):
            return path
        raise


def check_input_files(recipe: Recipe, path: Path, allowed: Sequence[Path] = ()) -> None:
    """Every file the recipe's stages read (their ``file_fields``): inside, a regular UTF-8 file, not empty, at most
    MAX_INPUT_FILE_BYTES."""
    for index, config in enumerate(recipe.stages):
        for name in STAGES[config.stage].file_fields:
            value = getattr(config, name)
            if value is None:
                continue
            where = f"{path}: stages[{index}].{name}"
            try:
                file = input_file(path.parent, value, allowed)
            except OutsideFolder as e:
                raise InputError(f"{where}: {e}; a recipe reads files in its own folder (or in one given with "
                                 "--allow-path DIR)") from None
            try:
                text = read_text_file(file, MAX_INPUT_FILE_BYTES, "file")
            except InputError as e:
                raise InputError(f"{where}: {e}") from None
            if not text.strip():
                raise InputError(f"{where}: {value} has no text (blank lines at most)")


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


def load_recipe(path: str | Path, allowed: Sequence[str | Path] = (), overrides: Sequence[str] = ()) -> Recipe:
    """The recipe at ``path``, with ``overrides`` (``KEY=VALUE``, see :func:`apply_overrides`) applied, validated,
    with the files it names checked; ``allowed``: folders outside the recipe's own that those files may lie in
    (``--allow-path``)."""
    path = Path(path)
    data = parse_recipe(read_text_file(path, MAX_RECIPE_BYTES, "recipe"), path)
    try:
        data = apply_overrides(data, overrides, path)
        _check_expanded_size(data, path)
        recipe = recipe_model().model_validate(data)
    except ValidationError as e:
        where = f"{path} (with --set {', '.join(overrides)})" if overrides else path
        raise InputError(_format_errors(e, where)) from None
    check_input_files(recipe, path, [Path(a) for a in allowed])
    return recipe


def json_schema() -> dict:
    return recipe_model().model_json_schema()
