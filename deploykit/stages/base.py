"""The stage contract: what a stage declares (:class:`StageSpec`) and what each of its hooks is given.

A stage is one module holding everything about it: its recipe settings (a :class:`StageConfig`), the
roles it reads and writes, its checks (against the rest of the recipe when the recipe loads, against
the teacher and this machine before a build writes anything), its run, its part of ``report.json`` and
``report.md``, and what it puts into the artifact's top-level folders. The recipe, the runner and the
report are generic over the stages registered in :mod:`deploykit.stages`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

if TYPE_CHECKING:
    from deploykit.stages.footprint import Demand, Footprint

# The models a build compares, each the role holding it. ``pruned`` is the student before distill: it
# exists exactly when a stage replaced the student and kept the one it replaced (distill's ``supersedes``).
COMPARED_MODELS = {"teacher": "teacher", "pruned": "student.pre_distill", "student": "student"}
# the packages (distribution names) whose versions a stage that builds or runs the torch models depends on
MODEL_PACKAGES = ("torch", "diffusers", "transformers")
# ... and one that makes, rewrites or runs ONNX graphs
ONNX_PACKAGES = ("onnx", "onnxscript", "onnxruntime", "onnx-graphsurgeon", "polygraphy")
# the largest text file a recipe may name (a spec's ``file_fields``: prompt files). A million prompts of
# 16 characters; MS-COCO's 30K captions are 1.5 MB.
MAX_INPUT_FILE_BYTES = 16 << 20


class StrictModel(BaseModel):
    """Recipe settings: an unknown key, a wrong type or a value out of range is an error naming the key."""

    # NaN and infinity compare false against every bound: refused, so a bound always holds
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class StageConfig(StrictModel):
    """One entry of a recipe's ``stages:`` list; subclasses fix ``stage`` to their name with a ``Literal``."""

    stage: str


@dataclass
class StageContext:
    config: Any
    inputs: dict[str, Path]
    out: Path
    work: Path
    seed: int
    console: Console
    recipe_dir: Path | None = None
    recipe: dict = field(default_factory=dict)  # the recipe fields the stage's spec names in ``recipe_fields``

    def read_json(self, role: str, name: str) -> dict:
        return json.loads((self.inputs[role] / name).read_text())

    @contextmanager
    def progress(self, description: str, total: int) -> Iterator[Callable[..., None]]:
        """``advance(n=1, **fields)``; shows a bar on a terminal and stays quiet in logs."""
        with Progress(TextColumn(f"  {description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                      TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                      console=self.console, transient=True,
                      disable=not self.console.is_terminal) as bar:
            task = bar.add_task(description, total=total, info="")

            def advance(n: int = 1, info: str = "") -> None:
                bar.update(task, advance=n, info=info)

            yield advance


@dataclass
class Preflight:
    """What a stage's preflight checks against, before a build writes anything: the recipe, the folder it
    lives in, and the kind of its teacher (known from the teacher's spec, no weights loaded)."""

    recipe: Any
    recipe_path: Path

    @property
    def where(self) -> str:
        """The prefix of a preflight's messages."""
        return f"{self.recipe_path}: stages"

    @property
    def recipe_dir(self) -> Path:
        return self.recipe_path.parent

    @cached_property
    def teacher_kind(self) -> str:
        """``pipeline`` (Stable Diffusion) or ``pixel``."""
        from deploykit.models.teacher import teacher_kind

        return teacher_kind(self.recipe.teacher, self.recipe_dir)

    def file(self, value: str) -> Path:
        """A file a recipe names, relative to the recipe."""
        return self.recipe_dir / value

    @cached_property
    def footprint(self):
        """The sizes of one sample, image and UNet call of this build's teacher (no weights loaded)."""
        from deploykit.stages.footprint import footprint

        return footprint(self.recipe, self.recipe_dir)


@dataclass
class ReportContext:
    """What a stage's report hook reads: its settings, its finished output folder, the models the report
    compares (``teacher``, ``pruned``, ``student`` and those earlier stages added, e.g. ``student-int8``)
    and the report as merged so far (read it, do not change it: return what to add)."""

    config: Any
    folder: Path
    entries: tuple[str, ...]
    report: dict

    def read_json(self, name: str) -> dict:
        return json.loads((self.folder / name).read_text())


@dataclass
class Markdown:
    """A stage's part of report.md: lines above the figures table (what the figures are), a block of
    paragraphs or tables below it, and images at the end."""

    caption: list[str] = field(default_factory=list)
    body: list[str] = field(default_factory=list)
    figures: list[str] = field(default_factory=list)


@dataclass
class PublishContext:
    """Where a stage puts what users take from the artifact: ``into`` maps each top-level output folder
    (``onnx``, ``plots``, ...; see :data:`deploykit.artifact.OUTPUT_DIRS`) to the folder being assembled in its
    place; ``folder`` is the stage's own output and ``roles`` every role's folder."""

    folder: Path
    roles: dict[str, Path]
    into: dict[str, Path]


@dataclass(frozen=True)
class StageSpec:
    """A stage: reads roles, writes roles (each a subfolder of its output), and how to run, check and report it.

    ``version`` is part of the cache key: bump it when the stage's outputs change meaning. ``key_ignores``
    names config fields left out of the key (settings checked after the stage, such as a quality gate).
    ``depends_on`` names the packages (distribution names) whose versions the stage's outputs depend on,
    and ``machine`` says that they depend on the machine too (timings: its CPU, threads and GPU): both are
    part of the key, so an upgrade or another machine runs the stage again instead of reusing its output.
    ``file_fields`` name config fields that are paths of input text files (relative to the recipe, inside
    its folder or a folder given with ``--allow-path``; checked when the recipe loads): their content is
    part of the key. A ``distributed`` stage runs on every process of a launched build
    (``accelerate launch``); the others run on the main process only.

    Roles: a stage that reads role R needs an earlier stage that writes it (the recipe says which to add).
    ``supersedes`` maps a role the stage rewrites to the name under which the runner keeps the earlier
    holder (distill: ``{"student": "student.pre_distill"}``, the student before distill).

    Hooks, all optional:

    - ``resolve(config, recipe) -> config``: fills defaults that depend on the rest of the recipe (the
      target), so the cache key holds what ran. An ``implicit`` stage is not listed in recipes and runs in
      every build: ``resolve(None, recipe)`` makes its config from the recipe's top-level fields.
    - ``check(config, recipe)``: raises ValueError when the stage's settings do not fit the rest of the
      recipe (its target, the other stages); runs when the recipe loads.
    - ``required(recipe) -> str | None``: why a recipe that does not list this stage needs it, if it does.
    - ``preflight(config, preflight)``: raises InputError when the stage cannot run with this teacher or on
      this machine; runs before a build writes anything.
    - ``key_inputs(config, preflight) -> dict``: digests of inputs from outside the artifact (the teacher's
      source files), part of the cache key.
    - ``memory(config, footprint) -> list[Demand]``: what the stage holds at once, as products of its settings
      with the sizes of a sample, an image and a UNet call (:mod:`deploykit.stages.footprint`); a build whose
      stage would not fit this machine's memory stops before it starts.
    - ``report(ReportContext) -> dict``: what the stage adds to report.json: its section and the fields of
      the model entries it measured. Sections merge key by key, in the order stages run.
    - ``conclude(config, report) -> dict``: fields that need every stage's figures (a quality gate's verdict),
      merged after all sections.
    - ``gate(config, report) -> str | None``: raises QualityGateError when the build's figures break the
      stage's limits (nothing is written then); otherwise a line saying how the check went.
    - ``markdown(report) -> Markdown | None``: the stage's part of report.md, from report.json alone (a
      remote bench re-renders it without the stages).
    - ``publish(PublishContext)``: copies what users take from the artifact into its top-level folders.

    ``models`` names the report entries the stage adds beside ``teacher`` / ``pruned`` / ``student``.
    """

    name: str
    version: str
    config: type[StrictModel]
    run: Callable[[StageContext], dict]
    reads: tuple[str, ...] = ()
    writes: dict[str, str] = field(default_factory=dict)
    optional_reads: tuple[str, ...] = ()
    supersedes: dict[str, str] = field(default_factory=dict)
    implicit: bool = False
    models: tuple[str, ...] = ()
    key_ignores: tuple[str, ...] = ()  # config fields that do not change the outputs
    # recipe fields (``target``, ``name``) the stage reads besides its own config: given in ``ctx.recipe`` and
    # part of its cache key
    recipe_fields: tuple[str, ...] = ()
    file_fields: tuple[str, ...] = ()
    depends_on: tuple[str, ...] = ()
    machine: bool = False
    distributed: bool = False
    resolve: Callable[[Any, Any], Any] | None = None
    check: Callable[[Any, Any], None] | None = None
    required: Callable[[Any], str | None] | None = None
    preflight: Callable[[Any, Preflight], None] | None = None
    key_inputs: Callable[[Any, Preflight], dict[str, str]] | None = None
    memory: Callable[[Any, Footprint], list[Demand]] | None = None
    report: Callable[[ReportContext], dict] | None = None
    conclude: Callable[[Any, dict], dict] | None = None
    gate: Callable[[Any, dict], str | None] | None = None
    markdown: Callable[[dict], Markdown | None] | None = None
    publish: Callable[[PublishContext], None] | None = None

    def provides(self) -> set[str]:
        """Every role this stage leaves behind: those it writes and those it keeps of the ones it replaces."""
        return set(self.writes) | set(self.supersedes.values())
