"""Assemble the artifact's outputs from the stage folders: report.json / report.md, plots, model, onnx, ...

The core is the models a build compares (``teacher``, ``pruned``: the student before distill, ``student``)
and the student's weights in ``model/``; every other figure and folder comes from the stage that made it
(its ``report``, ``conclude`` and ``publish`` hooks, :class:`deploykit.stages.StageSpec`), merged here
in the order the stages ran.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deploykit.artifact import OUTPUT_DIRS
from deploykit.io import atomic_write_json, atomic_write_text, make_temp_dir, replace_dir
from deploykit.recipe import Recipe
from deploykit.report import remote
from deploykit.report.markdown import models_in, render
from deploykit.stages import StageSpec
from deploykit.stages.base import COMPARED_MODELS, PublishContext, ReportContext
from deploykit.stages.data import TEACHER_JSON


@dataclass(frozen=True)
class StageOutput:
    """A stage of a finished build: its spec, the settings it ran with and its output folder."""

    spec: StageSpec
    config: Any
    folder: Path


def merge(into: dict, part: dict) -> dict:
    """``part`` into ``into``, key by key: dicts merge, anything else replaces."""
    for key, value in part.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            merge(into[key], value)
        else:
            into[key] = value
    return into


def _entries(report: dict, roles: dict[str, Path]) -> tuple[str, ...]:
    """The models the report compares: those whose role the build has, then those stages added (INT8 models)."""
    added = [m for m in models_in(report) if m not in COMPARED_MODELS]
    return tuple([name for name, role in COMPARED_MODELS.items() if role in roles] + added)


def assemble(recipe: Recipe, outputs: list[StageOutput], roles: dict[str, Path]) -> dict:
    """report.json: what every stage returns, merged in the order they ran; each model entry has ``quality``."""
    report: dict = {"recipe": recipe.name, "target": recipe.target}
    for out in outputs:
        if out.spec.report is not None:
            ctx = ReportContext(config=out.config, folder=out.folder, entries=_entries(report, roles), report=report)
            merge(report, out.spec.report(ctx))
    for out in outputs:
        if out.spec.conclude is not None:
            merge(report, out.spec.conclude(out.config, report))
    for name in _entries(report, roles):
        report.setdefault(name, {}).setdefault("quality", {})
    return report


def check_gates(outputs: list[StageOutput], report: dict) -> list[str]:
    """Raise :class:`deploykit.errors.QualityGateError` when a stage's limits are broken (quantize.max_quality_loss);
    otherwise a line per gate saying how it went."""
    lines = []
    for out in outputs:
        if out.spec.gate is not None:
            line = out.spec.gate(out.config, report)
            if line:
                lines.append(line)
    return lines


def merge_device_runs(report: dict, root: Path, roles: dict[str, Path]) -> list[Path]:
    """Device figures (`deploykit bench --host`) of this very bundle go into the report; returns the folders of runs
    that measured another bundle, for the caller to remove."""
    from deploykit.device.bundle import manifest_sha256

    return remote.merge(report, root, manifest_sha256(roles["bundle"]) if "bundle" in roles else None)


def write_outputs(root: Path, outputs: list[StageOutput], roles: dict[str, Path], report: dict) -> dict:
    """Write every top-level output; each folder is built aside and swapped in whole."""
    root = Path(root)
    staged: dict[str, Path] = {}
    try:
        for name in OUTPUT_DIRS:
            staged[name] = make_temp_dir(root, f".{name}.")
        final_model = roles.get("student", roles["teacher"]) / "model"
        shutil.copytree(final_model, staged["model"], dirs_exist_ok=True)
        atomic_write_json(staged["model"] / "scheduler_config.json",
                          json.loads((roles["teacher"] / TEACHER_JSON).read_text())["scheduler_config"])
        for out in outputs:
            if out.spec.publish is not None:
                out.spec.publish(PublishContext(folder=out.folder, roles=roles, into=staged))
        for name, tmp in staged.items():
            if any(tmp.iterdir()):
                replace_dir(tmp, root / name)
            else:
                shutil.rmtree(tmp)
                if (root / name).exists():
                    shutil.rmtree(root / name)
    finally:
        for tmp in staged.values():
            shutil.rmtree(tmp, ignore_errors=True)
    atomic_write_json(root / "report.json", report)
    atomic_write_text(root / "report.md", render(report))
    return report
