"""What every stage gets: its config, its input folders by role, an output folder, progress."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


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


@dataclass(frozen=True)
class StageSpec:
    """A stage: reads roles, writes roles (each a subfolder of its output), and how to run it.

    ``version`` is part of the cache key: bump it when the stage's outputs change meaning. ``key_ignores``
    names config fields left out of the key (settings checked after the stage, such as a quality gate).
    ``file_fields`` name config fields that are paths of input files (relative to the recipe): their
    content is part of the key. A ``distributed`` stage runs on every process of a launched build
    (``accelerate launch``); the others run on the main process only.
    """

    name: str
    version: str
    reads: tuple[str, ...]
    writes: dict[str, str]
    run: Callable[[StageContext], dict]
    optional_reads: tuple[str, ...] = field(default_factory=tuple)
    key_ignores: tuple[str, ...] = field(default_factory=tuple)  # config fields that do not change the outputs
    # recipe fields (``target``, ``name``) the stage reads besides its own config: given in ``ctx.recipe`` and
    # part of its cache key
    recipe_fields: tuple[str, ...] = field(default_factory=tuple)
    file_fields: tuple[str, ...] = field(default_factory=tuple)
    distributed: bool = False
