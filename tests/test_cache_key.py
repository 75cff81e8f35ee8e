"""The stage cache key holds the versions of the packages a stage's outputs depend on and, for timings, the
machine: an upgrade or another machine runs exactly the stages that depend on it again, and reuses the rest."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from deploykit import runner
from deploykit.stages import STAGES

RECIPE = """\
name: keyed
teacher: zoo:digits-tiny
seed: 0
stages:
  - stage: prune
    macs_target: 0.5
    round_to: 4
  - stage: export
    check_batch: 2
  - stage: bench
    backends: [torch-cpu, onnxruntime-cpu]
    batch_size: 4
    warmup: 0
    runs: 3
"""


def test_every_stage_declares_what_its_outputs_depend_on():
    for spec in STAGES.values():
        assert "torch" in spec.depends_on or spec.name == "engine", spec.name
    assert "torch-pruning" in STAGES["prune"].depends_on and "torch-pruning" not in STAGES["bench"].depends_on
    assert {"onnx", "onnxruntime"} <= set(STAGES["export"].depends_on) & set(STAGES["bench"].depends_on)
    assert "onnxruntime" not in STAGES["prune"].depends_on
    assert {name for name, spec in STAGES.items() if spec.machine} == {"engine", "bench", "decoder"}  # they time


def test_the_environment_names_versions_and_the_machine():
    bench, prune = runner.environment(STAGES["bench"]), runner.environment(STAGES["prune"])
    assert bench["packages"]["torch"] == prune["packages"]["torch"] == runner.package_version("torch")
    assert bench["packages"]["openvino"] == runner.package_version("openvino")  # None where it is not installed
    assert set(bench["machine"]) == {"cpu", "threads", "gpu"} and "machine" not in prune
    assert runner.package_version("onnxruntime") is not None  # whichever distribution installed it
    assert runner.package_version("no-such-package-here") is None


def _keys(out: Path) -> dict[str, str]:
    return {s["name"]: s["key"] for s in json.loads((out / "manifest.json").read_text())["stages"]}


def _build(recipe: Path, out: Path) -> dict[str, str]:
    from rich.console import Console

    from deploykit.recipe import load_recipe

    runner.build(load_recipe(recipe), recipe, out, Console(stderr=True, quiet=True))
    return _keys(out)


def _rerun(before: dict, after: dict) -> set[str]:
    return {name for name in before if before[name] != after[name]}


def test_an_upgrade_or_another_machine_runs_exactly_the_stages_that_depend_on_it(tmp_path, zoo_env, monkeypatch):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE)
    out = tmp_path / "out"
    first = _build(recipe, out)
    assert _build(recipe, out) == first  # nothing changed: everything reused

    real_version, real_machine = runner.package_version, runner.machine

    def upgraded(package: str):
        def version(name: str) -> str | None:
            return "999.0" if name == package else real_version(name)
        return version

    # ONNX Runtime: the export (its check runs the graph) and the bench; not the teacher nor the pruned student
    monkeypatch.setattr(runner, "package_version", upgraded("onnxruntime"))
    after = _build(recipe, out)
    assert _rerun(first, after) == {"export", "bench"}

    # another CPU: the timings, and nothing else
    monkeypatch.setattr(runner, "machine", lambda: {**real_machine(), "cpu": "Some Other CPU"})
    moved = _build(recipe, out)
    assert _rerun(after, moved) == {"bench"}

    # torch-pruning: the pruned student, and what reads it where its files changed (prune.json times the criterion)
    monkeypatch.setattr(runner, "package_version", upgraded("torch-pruning"))
    pruned = _build(recipe, out)
    assert "prune" in _rerun(moved, pruned) and "teacher" not in _rerun(moved, pruned)

    # back to this installation and machine: the first build's stages, still in the cache
    monkeypatch.setattr(runner, "package_version", real_version)
    monkeypatch.setattr(runner, "machine", real_machine)
    assert _build(recipe, out) == first


@pytest.mark.parametrize("field, value", [("depends_on", ("torch", "onnx")), ("machine", True)])
def test_a_stage_keys_what_its_spec_declares(monkeypatch, field, value):
    """No stage is named in the runner: a throwaway spec's declaration is what goes into its key."""
    from dataclasses import replace

    spec = replace(STAGES["export"], depends_on=(), machine=False)
    assert runner.environment(spec) == {}
    declared = runner.environment(replace(spec, **{field: value}))
    key = "packages" if field == "depends_on" else "machine"
    assert list(declared) == [key]
    assert runner.stage_key("s", "1", {}, 0, {}, declared) != runner.stage_key("s", "1", {}, 0, {}, {})
