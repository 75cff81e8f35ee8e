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
from pathlib import Path

from rich.console import Console

from deploykit.artifact import FILES_JSON, Artifact, digest, seal_stage, verify_stage
from deploykit.distributed import launched, process_state
from deploykit.errors import DeployKitError, InputError
from deploykit.io import sha256_file
from deploykit.models.teacher import check_teacher_spec, random_weights_spec, teacher_kind
from deploykit.recipe import Recipe
from deploykit.stages import STAGES, StageContext
from deploykit.stages.teacher import source_digest


@dataclass
class StageRecord:
    name: str
    key: str
    dir: str
    digest: str
    reused: bool
    seconds: float
    summary: dict = field(default_factory=dict)


def stage_key(name: str, version: str, config: dict, seed: int, inputs: dict[str, str]) -> str:
    blob = json.dumps({"stage": name, "version": version, "config": config, "seed": seed, "inputs": inputs},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


class Runner:
    def __init__(self, recipe: Recipe, recipe_path: Path, out: Path, console: Console | None = None):
        self.recipe = recipe
        self.recipe_path = Path(recipe_path)
        self.artifact = Artifact(out)
        self.state = process_state() if launched() else None
        self.is_main = self.state is None or self.state.is_main_process
        # the main process speaks for all of them
        self.console = (console or Console(stderr=True)) if self.is_main else Console(stderr=True, quiet=True)

    def _stage_list(self) -> list[tuple[str, object]]:
        teacher_cfg = {"teacher": self.recipe.teacher, "resolution": self.recipe.resolution}
        # defaults that depend on the target are resolved here, so the cache key holds what ran
        stages = [s.model_copy(update={"round_to": self.recipe.round_to()}) if s.stage == "prune" else s
                  for s in self.recipe.stages]
        return [("teacher", teacher_cfg)] + [(s.stage, s) for s in stages]

    def build(self) -> dict | None:
        # Everything that can be checked before writing is checked before writing.
        check_teacher_spec(self.recipe.teacher, self.recipe_path.parent)
        self._check_stages_fit_teacher(teacher_kind(self.recipe.teacher, self.recipe_path.parent))
        teacher_source = source_digest(self.recipe.teacher, self.recipe_path.parent)
        if not self.is_main:
            self._follow(teacher_source)
            return None
        self.artifact.check_writable()
        shared = self._last_distributed_stage()
        if self.state is not None:
            self.console.print(f"{self.state.num_processes} processes: "
                               + ("distill runs on all of them, every other stage on this one" if shared >= 0
                                  else "no stage of this recipe trains in parallel; the others have nothing to do"))
        with self.artifact.lock():
            removed = self.artifact.clean_partial()
            if removed:
                self.console.print(f"[yellow]removed {len(removed)} half-written stage folder(s) of an interrupted build[/]")
            roles: dict[str, tuple[Path, str]] = {}  # role -> (folder, digest of its producing stage)
            records: list[StageRecord] = []
            for index, (name, config) in enumerate(self._stage_list()):
                records.append(self._run_stage(index, name, config, roles, teacher_source))
                if index <= shared:
                    self.state.wait_for_everyone()  # the followers take this stage from the cache now
            return self._finalize(records, roles)

    def _last_distributed_stage(self) -> int:
        """Index of the last stage the other processes join; -1 in one process or without such a stage."""
        if self.state is None:
            return -1
        return max((i for i, (name, _) in enumerate(self._stage_list()) if STAGES[name].distributed), default=-1)

    def _agree_to_run(self, run: bool | None = None) -> bool:
        """The main process tells the others whether it runs a distributed stage (or takes it from the cache)."""
        from accelerate.utils import broadcast_object_list

        return bool(broadcast_object_list([run], from_process=0)[0])

    def _follow(self, teacher_source: str) -> None:
        """A non-main process: run the distributed stages beside the main one, take every other stage's output
        from the cache once the main process has written it, and stop after the last distributed stage."""
        roles: dict[str, tuple[Path, str]] = {}
        for index, (name, config) in enumerate(self._stage_list()[:self._last_distributed_stage() + 1]):
            spec, inputs, key, final = self._resolve(index, name, config, roles, teacher_source)
            if spec.distributed and self._agree_to_run():  # the main process decides: a cached stage is not run
                with tempfile.TemporaryDirectory(prefix=f"deploykit-{name}-rank{self.state.process_index}-") as scratch:
                    ctx = StageContext(config=config, inputs={r: p for r, (p, _) in inputs.items()}, out=Path(scratch),
                                       work=self.artifact.work_dir(name, key), seed=self.recipe.seed, console=self.console,
                                       recipe_dir=self.recipe_path.parent)
                    spec.run(ctx)
            self.state.wait_for_everyone()
            listing = final / FILES_JSON
            if not listing.is_file():
                raise DeployKitError(f"process {self.state.process_index}: stage {name} is not in the cache after the main "
                                     f"process ran it ({final}); is --out on a file system every machine shares?")
            stage_digest = digest(json.loads(listing.read_text()))  # the main process has just verified or written it
            for role, sub in spec.writes.items():
                roles[role] = ((final / sub).resolve() if sub != "." else final, stage_digest)

    def _check_stages_fit_teacher(self, kind: str) -> None:
        where = f"{self.recipe_path}: stages"
        quantize = self.recipe.stage("quantize")
        if quantize is not None and quantize.backend == "modelopt":
            from deploykit.quantize.modelopt_int8 import INSTALL_HINT, modelopt_available

            if not modelopt_available():
                raise InputError(f"{where}: quantize.backend modelopt needs nvidia-modelopt, which is not installed: "
                                 f"{INSTALL_HINT}; or use backend onnxruntime")
        if kind == "pipeline" and quantize is not None and quantize.max_quality_loss is not None \
                and quantize.max_quality_loss.fid is not None:
            raise InputError(f"{where}: quantize.max_quality_loss.fid: FID is not measured for Stable Diffusion pipelines; "
                             "use psnr_vs_teacher / ssim_vs_teacher")
        if self.recipe.stage("engine") is not None:
            from deploykit.engines.tensorrt import tensorrt_missing

            reason = tensorrt_missing()
            if reason is None:
                import torch

                if not torch.cuda.is_available():
                    reason = "TensorRT builds engines on an NVIDIA GPU and torch sees no CUDA device"
            if reason is not None:
                raise InputError(f"{where}: the engine stage builds TensorRT engines here, and it cannot: {reason}; "
                                 "or remove the engine stage")
        distill = self.recipe.stage("distill")
        if distill is not None:
            if kind == "pipeline" and distill.prompts is None:
                raise InputError(f"{where}: distill.prompts: Stable Diffusion teachers are distilled on prompts; name a text "
                                 "file with one prompt per line (relative to the recipe)")
            if kind != "pipeline" and distill.prompts is not None:
                raise InputError(f"{where}: distill.prompts is for Stable Diffusion teachers; {self.recipe.teacher} is a "
                                 "pixel-space UNet, which recovers on its data set or its own samples")
            if distill.prompts is not None:
                from deploykit.stages.data import read_prompts

                read_prompts(self._recipe_file(distill.prompts))
        if kind == "pipeline":
            from deploykit.prune import get_criterion

            prune = self.recipe.stage("prune")
            # gradient loops call model(x_t, t) without text conditioning; block-removal calibration has it
            if prune is not None and get_criterion(prune.criterion).needs_gradients:
                raise InputError(f"{where}: prune.criterion {prune.criterion} needs training images; for Stable "
                                 "Diffusion UNets use magnitude, random or block-removal")
        else:
            bench = self.recipe.stage("bench")
            if bench is not None and bench.end_to_end is not None:
                raise InputError(f"{where}: bench.end_to_end times SD pipelines; teacher {self.recipe.teacher} is a "
                                 "pixel-space UNet")

    def _recipe_values(self, spec) -> dict:
        """The recipe fields (``target``, ``name``) a stage reads besides its own config."""
        return {f: getattr(self.recipe, f) for f in spec.recipe_fields}

    def _recipe_file(self, value: str) -> Path:
        return self.recipe_path.parent / value

    def _resolve(self, index: int, name: str, config, roles: dict, teacher_source: str):
        """(spec, inputs, key, final folder) of a stage, given the roles of the stages before it."""
        spec = STAGES[name]
        missing = [r for r in spec.reads if r not in roles]
        if missing:
            raise InputError(f"stage {name} needs {', '.join(missing)} from an earlier stage")
        inputs = {r: roles[r] for r in spec.reads + spec.optional_reads if r in roles}
        config_dict = config.model_dump() if hasattr(config, "model_dump") else dict(config)
        config_dict = {k: v for k, v in config_dict.items() if k not in spec.key_ignores}
        recipe_values = self._recipe_values(spec)
        if recipe_values:
            config_dict["recipe"] = recipe_values
        input_digests = {r: f"{d}:{p.name}" for r, (p, d) in inputs.items()}
        if name == "teacher":
            input_digests["source"] = teacher_source
        for field_name in spec.file_fields:  # an edited prompt file is a new input
            value = config_dict.get(field_name)
            if value is not None:
                input_digests[f"file:{field_name}"] = sha256_file(self._recipe_file(value))
        key = stage_key(name, spec.version, config_dict, self.recipe.seed, input_digests)
        return spec, inputs, key, self.artifact.stage_dir(index, name, key)

    def _run_stage(self, index: int, name: str, config, roles: dict, teacher_source: str) -> StageRecord:
        spec, inputs, key, final = self._resolve(index, name, config, roles, teacher_source)
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
        for role, sub in spec.writes.items():
            roles[role] = ((final / sub).resolve() if sub != "." else final, digest)
        return StageRecord(name, key, final.name, digest, reused, round(time.perf_counter() - started, 2), summary)

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

    def _finalize(self, records: list[StageRecord], roles: dict) -> dict:
        from deploykit.device.bundle import manifest_sha256
        from deploykit.report import assemble, check_quality_gate, remote, write_outputs

        stages = [{"name": r.name, "key": r.key, "dir": r.dir, "digest": r.digest} for r in records]
        folders = {r: p for r, (p, _) in roles.items()}
        report = assemble(self.recipe, folders)
        # device figures (`deploykit bench --host`) of this very bundle stay in the report; others are dropped
        stale_remote = remote.merge(report, self.artifact.root,
                                    manifest_sha256(folders["bundle"]) if "bundle" in folders else None)
        # before anything is written: a build that fails its quality gate leaves the artifact as it was
        gate = check_quality_gate(report)
        if gate:
            self.console.print(f"[green]{gate}[/]")
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
        remote.remove(self.artifact.root, stale_remote)
        write_outputs(self.artifact.root, self.recipe, folders, report=report)
        self.artifact.write_manifest(self.recipe.model_dump(), str(self.recipe_path), stages)
        return report


def build(recipe: Recipe, recipe_path: Path, out: Path, console: Console | None = None,
          random_weights: bool = False) -> dict | None:
    """Run ``recipe``; ``random_weights`` swaps the teacher for its topology with random weights (speed only).

    Returns the report; None in the non-main processes of a launched build."""
    if random_weights:
        recipe = recipe.model_copy(update={"teacher": random_weights_spec(recipe.teacher, recipe.topology)})
    return Runner(recipe, recipe_path, out, console).build()
