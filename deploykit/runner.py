"""Runs a recipe's stages in order, each cached under a key of its inputs' content and its config.

A stage is skipped when a folder with its key exists and its files still match their recorded
hashes; an interrupted stage left only a ``.tmp-*`` folder (removed on the next run) and, for long
stages, checkpoints in its work folder, from which it resumes.

Started by ``accelerate launch`` / ``torchrun`` with several processes, the main process runs the
build as usual and the others follow it up to the last distributed stage (distill): they wait at a
barrier after each stage, take its output from the cache, and run the distributed stages beside the
main process (DDP), writing nothing. See :mod:`deploykit.distributed`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from rich.console import Console

from deploykit.artifact import FILES_JSON, Artifact, digest, seal_stage, verify_stage
from deploykit.bench.machine import cpu_name
from deploykit.distributed import launched, process_state
from deploykit.errors import DeployKitError, InputError
from deploykit.io import sha256_file
from deploykit.models.teacher import random_weights_spec
from deploykit.recipe import Recipe
from deploykit.runtime.backends import cpu_threads
from deploykit.stages import StageContext, StageSpec
from deploykit.stages.base import Preflight
from deploykit.stages.footprint import check_memory, gib


@dataclass
class StageRecord:
    name: str
    key: str
    folder: Path
    digest: str
    reused: bool
    seconds: float
    summary: dict = field(default_factory=dict)


def stage_key(name: str, version: str, config: dict, seed: int, inputs: dict[str, str], environment: dict | None = None) -> str:
    blob = json.dumps({"stage": name, "version": version, "config": config, "seed": seed, "inputs": inputs,
                       "environment": environment or {}}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


# the distributions that install a package a stage names in ``depends_on`` under another name
_DISTRIBUTIONS = {"onnxruntime": ("onnxruntime", "onnxruntime-gpu", "onnxruntime-openvino"),
                  "tensorrt": ("tensorrt", "tensorrt-cu12", "tensorrt-cu11")}


def package_version(name: str) -> str | None:
    """The installed version of ``name`` (a distribution name); None where it is not installed."""
    for dist in _DISTRIBUTIONS.get(name, (name,)):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None


def machine() -> dict:
    """What a timing depends on besides the software: the CPU, the threads a stage runs on, the GPU."""
    import torch

    return {"cpu": cpu_name(), "threads": cpu_threads(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def environment(spec: StageSpec) -> dict:
    """The part of a stage's key that comes from this installation and machine (its spec's ``depends_on``, ``machine``)."""
    env: dict = {}
    if spec.depends_on:
        env["packages"] = {name: package_version(name) for name in spec.depends_on}
    if spec.machine:
        env["machine"] = machine()
    return env


def plan_skips(recipe: Recipe, recipe_path: Path, plan: list, skip: dict[str, str]) -> list:
    """The plan without the stages in ``skip`` (name -> why); InputError when one is not in the recipe, is one the
    recipe's target needs, or writes a role a later stage reads and no other stage provides. A skipped stage
    passes its inputs through: the roles it would have replaced keep their earlier holders."""
    listed = [spec.name for spec, _ in plan if not spec.implicit]
    for name in skip:
        if name not in listed:
            raise InputError(f"--skip {name}: {recipe_path} has no {name} stage (its stages: {', '.join(listed)})")
        spec = next(spec for spec, _ in plan if spec.name == name)
        reason = spec.required(recipe) if spec.required is not None else None
        if reason:
            raise InputError(f"--skip {name}: {reason}")
    kept, available = [], set()
    for spec, config in plan:
        if spec.name in skip:
            continue
        missing = [r for r in spec.reads if r not in available]
        if missing:
            writers = [s.name for s, _ in plan if s.name in skip and missing[0] in s.provides()]
            raise InputError(f"--skip {', '.join(writers) or ', '.join(skip)}: stage {spec.name} reads {missing[0]}, which "
                             f"no other stage of {recipe_path} writes; skip {spec.name} too, or keep "
                             f"{' and '.join(writers) or 'the stage that writes it'}")
        available |= spec.provides()
        kept.append((spec, config))
    return kept


class Runner:
    def __init__(self, recipe: Recipe, recipe_path: Path, out: Path, console: Console | None = None,
                 skip: dict[str, str] | None = None, overrides: tuple[str, ...] = ()):
        self.recipe = recipe
        self.recipe_path = Path(recipe_path)
        self.skip = dict(skip or {})
        self.overrides = tuple(overrides)
        self.artifact = Artifact(out)
        self.state = process_state() if launched() else None
        self.is_main = self.state is None or self.state.is_main_process
        # the main process speaks for all of them
        self.console = (console or Console(stderr=True)) if self.is_main else Console(stderr=True, quiet=True)

    def check(self) -> tuple[list, dict, dict[str, int]]:
        """Everything that can be checked before writing: each stage's preflight, the memory its settings need,
        the folder to write. Returns the plan, the digests of what stages read from outside the artifact (the
        teacher's files: part of their keys) and each stage's memory estimate in bytes."""
        plan = plan_skips(self.recipe, self.recipe_path, self.recipe.plan(), self.skip)
        preflight = Preflight(self.recipe, self.recipe_path)
        for spec, config in plan:
            if spec.preflight is not None:
                spec.preflight(config, preflight)
        estimates = check_memory(plan, preflight.footprint, preflight.where)
        outside = {spec.name: spec.key_inputs(config, preflight) for spec, config in plan if spec.key_inputs is not None}
        if self.is_main:
            self.artifact.check_writable()
        return plan, outside, estimates

    def build(self) -> dict | None:
        plan, outside, _ = self.check()
        for name, why in self.skip.items():
            self.console.print(f"[yellow]{name}: skipped ({why})[/]")
        if not self.is_main:
            self._follow(plan, outside)
            return None
        shared = self._last_distributed_stage(plan)
        if self.state is not None:
            together = " and ".join(spec.name for spec, _ in plan if spec.distributed)
            self.console.print(f"{self.state.num_processes} processes: "
                               + (f"{together} on all of them, every other stage on this one" if together
                                  else "no stage of this recipe trains in parallel; the others have nothing to do"))
        with self.artifact.lock():
            removed = self.artifact.clean_partial()
            if removed:
                self.console.print(f"[yellow]removed {len(removed)} half-written stage folder(s) of an interrupted build[/]")
            roles: dict[str, tuple[Path, str]] = {}  # role -> (folder, digest of its producing stage)
            records: list[StageRecord] = []
            for index, (spec, config) in enumerate(plan):
                records.append(self._run_stage(index, spec, config, roles, outside))
                if index <= shared:
                    self.state.wait_for_everyone()  # the followers take this stage from the cache now
            return self._finalize(plan, records, roles)

    def _last_distributed_stage(self, plan: list) -> int:
        """Index of the last stage the other processes join; -1 in one process or without such a stage."""
        if self.state is None:
            return -1
        return max((i for i, (spec, _) in enumerate(plan) if spec.distributed), default=-1)

    def _agree_to_run(self, run: bool | None = None) -> bool:
        """The main process tells the others whether it runs a distributed stage (or takes it from the cache)."""
        from accelerate.utils import broadcast_object_list

        return bool(broadcast_object_list([run], from_process=0)[0])

    def _follow(self, plan: list, outside: dict) -> None:
        """A non-main process: run the distributed stages beside the main one, take every other stage's output
        from the cache once the main process has written it, and stop after the last distributed stage."""
        roles: dict[str, tuple[Path, str]] = {}
        for index, (spec, config) in enumerate(plan[:self._last_distributed_stage(plan) + 1]):
            inputs, key, final = self._resolve(index, spec, config, roles, outside)
            if spec.distributed and self._agree_to_run():  # the main process decides: a cached stage is not run
                with tempfile.TemporaryDirectory(prefix=f"deploykit-{spec.name}-rank{self.state.process_index}-") as scratch:
                    ctx = StageContext(config=config, inputs={r: p for r, (p, _) in inputs.items()}, out=Path(scratch),
                                       work=self.artifact.work_dir(spec.name, key), seed=self.recipe.seed,
                                       console=self.console, recipe_dir=self.recipe_path.parent)
                    spec.run(ctx)
            self.state.wait_for_everyone()
            listing = final / FILES_JSON
            if not listing.is_file():
                raise DeployKitError(f"process {self.state.process_index}: stage {spec.name} is not in the cache after the "
                                     f"main process ran it ({final}); is --out on a file system every machine shares?")
            # the main process has just verified or written it
            _hand_over(spec, final, digest(json.loads(listing.read_text())), roles)

    def _recipe_values(self, spec) -> dict:
        """The recipe fields (``target``, ``name``) a stage reads besides its own config."""
        return {f: getattr(self.recipe, f) for f in spec.recipe_fields}

    def _recipe_file(self, value: str) -> Path:
        return self.recipe_path.parent / value

    def _resolve(self, index: int, spec: StageSpec, config, roles: dict, outside: dict):
        """(inputs, key, final folder) of a stage, given the roles of the stages before it."""
        missing = [r for r in spec.reads if r not in roles]
        if missing:
            raise InputError(f"stage {spec.name} needs {', '.join(missing)} from an earlier stage")
        inputs = {r: roles[r] for r in spec.reads + spec.optional_reads if r in roles}
        config_dict = {k: v for k, v in config.model_dump().items() if k not in spec.key_ignores}
        recipe_values = self._recipe_values(spec)
        if recipe_values:
            config_dict["recipe"] = recipe_values
        input_digests = {r: f"{d}:{p.name}" for r, (p, d) in inputs.items()} | outside.get(spec.name, {})
        for field_name in spec.file_fields:  # an edited prompt file is a new input
            value = config_dict.get(field_name)
            if value is not None:
                input_digests[f"file:{field_name}"] = sha256_file(self._recipe_file(value))
        key = stage_key(spec.name, spec.version, config_dict, self.recipe.seed, input_digests, environment(spec))
        return inputs, key, self.artifact.stage_dir(index, spec.name, key)

    def _run_stage(self, index: int, spec: StageSpec, config, roles: dict, outside: dict) -> StageRecord:
        name = spec.name
        inputs, key, final = self._resolve(index, spec, config, roles, outside)
        started = time.perf_counter()
        digest = None
        if final.is_dir():
            digest, problems = verify_stage(final)
            if problems:
                self.console.print(f"[yellow]{name}: cached output was modified ({problems[0]}); running it again[/]")
                shutil.rmtree(final)
                digest = None
        reused = digest is not None
        if spec.distributed and self.state is not None:
            self._agree_to_run(not reused)
        summary: dict = {}
        if reused:
            self.console.print(f"[dim]{name}: up to date ({final.name})[/]")
        else:
            self.console.print(f"[bold]{name}[/]")
            summary, digest = self._execute(spec, index, name, key, config, {r: p for r, (p, _) in inputs.items()}, final,
                                            self._recipe_values(spec))
        _hand_over(spec, final, digest, roles)
        return StageRecord(name, key, final, digest, reused, round(time.perf_counter() - started, 2), summary)

    def _execute(self, spec, index, name, key, config, inputs, final: Path, recipe_values: dict) -> tuple[dict, str]:
        self.artifact.stages.mkdir(parents=True, exist_ok=True)
        tmp = self.artifact.stages / f".tmp-{index:02d}-{name}-{key[:16]}-{os.getpid()}"
        tmp.mkdir()
        work = self.artifact.work_dir(name, key)
        work.mkdir(exist_ok=True)
        ctx = StageContext(config=config, inputs=inputs, out=tmp, work=work, seed=self.recipe.seed,
                           console=self.console, recipe_dir=self.recipe_path.parent, recipe=recipe_values)
        try:
            summary = spec.run(ctx) or {}
            digest = seal_stage(tmp)
            os.replace(tmp, final)
        except BaseException:
            # keep `work` (checkpoints) so that the next run resumes; drop the partial output
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        shutil.rmtree(work, ignore_errors=True)
        return summary, digest

    def _finalize(self, plan: list, records: list[StageRecord], roles: dict) -> dict:
        from deploykit.report import StageOutput, assemble, check_gates, merge_device_runs, write_outputs
        from deploykit.report.remote import remove

        stages = [{"name": r.name, "key": r.key, "dir": r.folder.name, "digest": r.digest} for r in records]
        outputs = [StageOutput(spec, config, r.folder) for (spec, config), r in zip(plan, records)]
        folders = {r: p for r, (p, _) in roles.items()}
        report = assemble(self.recipe, outputs, folders)
        if self.skip:
            report["skipped"] = dict(self.skip)
        # device figures (`deploykit bench --host`) of this very bundle stay in the report; others are dropped
        stale_remote = merge_device_runs(report, self.artifact.root, folders)
        # before anything is written: a build that fails its quality gate leaves the artifact as it was
        for line in check_gates(outputs, report):
            self.console.print(f"[green]{line}[/]")
        if self.artifact.manifest_path.is_file() and all(r.reused for r in records):
            try:
                previous = self.artifact.read_manifest()
                current = json.loads((self.artifact.root / "report.json").read_text())
                if (previous.get("stages") == stages and current == json.loads(json.dumps(report))
                        and not self.artifact.verify()):
                    self.console.print(f"[green]{self.artifact.root}: up to date, nothing to do[/]")
                    return current
            except (InputError, OSError, json.JSONDecodeError):
                pass
        remove(self.artifact.root, stale_remote)
        write_outputs(self.artifact.root, outputs, folders, report)
        extra = {k: v for k, v in (("skipped", self.skip), ("overrides", list(self.overrides))) if v}
        self.artifact.write_manifest(self.recipe.model_dump(), str(self.recipe_path), stages, extra)
        return report


def _hand_over(spec: StageSpec, final: Path, stage_digest: str, roles: dict) -> None:
    """The roles a finished stage leaves to the stages after it; a role it rewrites keeps its earlier holder
    under the name the stage's ``supersedes`` gives (the student before distill: ``student.pre_distill``)."""
    for role, kept_as in spec.supersedes.items():
        if role in roles:
            roles[kept_as] = roles[role]
    for role, sub in spec.writes.items():
        roles[role] = ((final / sub).resolve() if sub != "." else final, stage_digest)


def _teacher_swapped(recipe: Recipe, random_weights: bool) -> Recipe:
    if not random_weights:
        return recipe
    return recipe.model_copy(update={"teacher": random_weights_spec(recipe.teacher, recipe.topology)})


def skip_reasons(names: list[str], random_weights: bool) -> dict[str, str]:
    """Why each stage named by ``--skip`` did not run, as the report and manifest say it."""
    why = "--skip on the command line" + ("; a --random-weights build measures speed only" if random_weights else "")
    return {name: why for name in names}


def build(recipe: Recipe, recipe_path: Path, out: Path, console: Console | None = None,
          random_weights: bool = False, skip: dict[str, str] | None = None, overrides: tuple[str, ...] = ()) -> dict | None:
    """Run ``recipe``; ``random_weights`` swaps the teacher for its topology with random weights (speed only);
    ``skip`` names stages not to run, each with why (the report and manifest record it); ``overrides`` are the
    ``--set`` settings already applied to ``recipe``, recorded in the manifest.

    Returns the report; None in the non-main processes of a launched build."""
    return Runner(_teacher_swapped(recipe, random_weights), recipe_path, out, console, skip, overrides).build()


def dry_run(recipe: Recipe, recipe_path: Path, out: Path, random_weights: bool = False,
            skip: dict[str, str] | None = None) -> dict[str, str]:
    """Check what ``build`` checks before it writes, and write nothing: each stage the build would run, with its
    memory estimate ("" where it has none)."""
    runner = Runner(_teacher_swapped(recipe, random_weights), recipe_path, out, Console(quiet=True), skip)
    plan, _, estimates = runner.check()
    return {spec.name: gib(estimates[spec.name]) if estimates.get(spec.name) else "" for spec, _ in plan}
