"""A stage is one module plus one registry line: a throwaway stage, registered here, is in the recipe schema,
the order and role checks, the build and its report, with no other file changed."""

import json
import re
from pathlib import Path
from typing import Literal

import pytest
from pydantic import Field

from deploykit.errors import InputError
from deploykit.io import atomic_write_json
from deploykit.recipe import json_schema, load_recipe
from deploykit.stages import STAGES
from deploykit.stages.base import Markdown, ReportContext, StageConfig, StageContext, StageSpec

# --- the whole throwaway stage --------------------------------------------------------------------------


class StampStage(StageConfig):
    """Counts the student's weight files and stamps a note beside them."""

    stage: Literal["stamp"] = "stamp"
    note: str = Field("hello", min_length=1, description="what to stamp")


def _run(ctx: StageContext) -> dict:
    files = sorted(p.name for p in (ctx.inputs["student"] / "model").iterdir())
    atomic_write_json(ctx.out / "stamp.json", {"note": ctx.config.note, "student_files": files})
    return {}


def _report(ctx: ReportContext) -> dict:
    stamp = ctx.read_json("stamp.json")
    return {"stamp": stamp, "student": {"stamped": ctx.config.note}}


def _markdown(report: dict) -> Markdown | None:
    if "stamp" not in report:
        return None
    return Markdown(body=[f"Stamp: {report['stamp']['note']} on {len(report['stamp']['student_files'])} files."])


STAMP = StageSpec(name="stamp", version="1", config=StampStage, reads=("student",), writes={"stamp": "."}, run=_run,
                  report=_report, markdown=_markdown)

# ---------------------------------------------------------------------------------------------------------


@pytest.fixture
def stamp(monkeypatch):
    """STAMP registered for one test: the registry line, at the end of the run order."""
    monkeypatch.setitem(STAGES, "stamp", STAMP)
    return STAMP


def _recipe(tmp_path: Path, stages: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(f"name: stamped\nteacher: zoo:digits-tiny\nstages:\n{stages}")
    return path


def test_a_registered_stage_is_in_the_recipe_schema(stamp):
    schema = json.dumps(json_schema())
    assert "StampStage" in schema and "what to stamp" in schema


def test_an_unregistered_stage_is_not():
    assert "stamp" not in STAGES and "StampStage" not in json.dumps(json_schema())


def test_a_registered_stage_takes_its_place_in_the_order_and_its_reads_are_checked(stamp, tmp_path):
    with pytest.raises(InputError, match="stages must run in the order prune -> stamp"):
        load_recipe(_recipe(tmp_path, "  - stage: stamp\n  - stage: prune\n"))
    # it reads the student: the message names the stages that write one
    with pytest.raises(InputError, match="stamp reads student, which no stage before it writes: add a prune or sparsify"):
        load_recipe(_recipe(tmp_path, "  - stage: stamp\n"))
    with pytest.raises(InputError, match=r"stages\[1\]\.note"):
        load_recipe(_recipe(tmp_path, "  - stage: prune\n  - stage: stamp\n    note: ''\n"))
    recipe = load_recipe(_recipe(tmp_path, "  - stage: prune\n    round_to: 4\n  - stage: stamp\n    note: checked\n"))
    assert [spec.name for spec, _ in recipe.plan()] == ["teacher", "prune", "stamp"]


def test_a_registered_stage_runs_and_reports(stamp, tmp_path, zoo_env):
    from rich.console import Console

    from deploykit.runner import build

    recipe = _recipe(tmp_path, "  - stage: prune\n    round_to: 4\n  - stage: stamp\n    note: checked\n")
    out = tmp_path / "out"
    report = build(load_recipe(recipe), recipe, out, Console(stderr=True, quiet=True))
    assert report["stamp"]["note"] == "checked" and "model.safetensors" in report["stamp"]["student_files"]
    assert report["student"]["stamped"] == "checked" and report["student"]["params"] > 0  # merged beside prune's figures
    assert json.loads((out / "report.json").read_text()) == report
    assert "Stamp: checked on" in (out / "report.md").read_text()
    assert [s["name"] for s in json.loads((out / "manifest.json").read_text())["stages"]] == ["teacher", "prune", "stamp"]
    assert "pruned" not in report  # no distill: there is no student before distill to compare


def test_distill_keeps_the_student_it_replaces_as_a_role():
    from deploykit.runner import _hand_over

    roles: dict = {}
    _hand_over(STAGES["teacher"], Path("/a/teacher"), "t", roles)
    _hand_over(STAGES["prune"], Path("/a/prune"), "p", roles)
    assert roles["student"] == (Path("/a/prune"), "p") and "student.pre_distill" not in roles
    _hand_over(STAGES["sparsify"], Path("/a/sparsify"), "s", roles)
    _hand_over(STAGES["distill"], Path("/a/distill"), "d", roles)
    assert roles["student"] == (Path("/a/distill"), "d")
    assert roles["student.pre_distill"] == (Path("/a/sparsify"), "s")  # the report's "pruned": the 2:4 student


@pytest.mark.parametrize("module", ["runner.py", "recipe.py"])
def test_the_runner_and_the_recipe_name_no_stage(module):
    from deploykit.recipe import Recipe

    source = (Path(__file__).resolve().parents[1] / "deploykit" / module).read_text()
    # (the recipe's own `teacher:` field shares the teacher stage's name)
    named = sorted({m for m in re.findall(r"[\"']([a-z]+)[\"']", source) if m in STAGES and m not in Recipe.model_fields})
    assert named == [], f"deploykit/{module} names stages {named}: give their specs a hook instead"
