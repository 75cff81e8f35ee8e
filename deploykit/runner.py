"""Runs a recipe's stages in order, each cached under a key of its inputs' content and its config.

A stage is skipped when a folder with its key exists and its files still match their recorded
hashes; an interrupted stage left only a ``.tmp-*`` folder (removed on the next run) and, for long
stages, checkpoints in its work folder, from which it resumes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console

from deploykit.artifact import Artifact, seal_stage, verify_stage
from deploykit.errors import InputError
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
        self.console = console or Console(stderr=True)

    def _stage_list(self) -> list[tuple[str, object]]:
        teacher_cfg = {"teacher": self.recipe.teacher, "resolution": self.recipe.resolution}
        # defaults that depend on the target are resolved here, so the cache key holds what ran
        stages = [s.model_copy(update={"round_to": self.recipe.round_to()}) if s.stage == "prune" else s
                  for s in self.recipe.stages]
        return [("teacher", teacher_cfg)] + [(s.stage, s) for s in stages]

    def build(self) -> dict:
        # Everything that can be checked before writing is checked before writing.
        check_teacher_spec(self.recipe.teacher, self.recipe_path.parent)
        self._check_stages_fit_teacher(teacher_kind(self.recipe.teacher, self.recipe_path.parent))
        teacher_source = source_digest(self.recipe.teacher, self.recipe_path.parent)
        self.artifact.check_writable()
        with self.artifact.lock():
            removed = self.artifact.clean_partial()
            if removed:
                self.console.print(f"[yellow]removed {len(removed)} half-written stage folder(s) of an interrupted build[/]")
            roles: dict[str, tuple[Path, str]] = {}  # role -> (folder, digest of its producing stage)
            records: list[StageRecord] = []
            for index, (name, config) in enumerate(self._stage_list()):
                records.append(self._run_stage(index, name, config, roles, teacher_source))
            return self._finalize(records, roles)

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
            from deploykit.export.tensorrt import tensorrt_missing

            reason = tensorrt_missing()
            if reason is None:
                import torch

                if not torch.cuda.is_available():
                    reason = "TensorRT builds engines on an NVIDIA GPU and torch sees no CUDA device"
            if reason is not None:
                raise InputError(f"{where}: the engine stage builds TensorRT engines here, and it cannot: {reason}; "
                                 "or remove the engine stage")
        if kind == "pipeline":
            if self.recipe.stage("distill") is not None:
                raise InputError(f"{where}: distill of Stable Diffusion UNets is not implemented yet (it needs prompt "
                                 "data; see the DaKD issue); remove the distill stage")
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

    def _run_stage(self, index: int, name: str, config, roles: dict, teacher_source: str) -> StageRecord:
        spec = STAGES[name]
        missing = [r for r in spec.reads if r not in roles]
        if missing:
            raise InputError(f"stage {name} needs {', '.join(missing)} from an earlier stage")
        inputs = {r: roles[r] for r in spec.reads + spec.optional_reads if r in roles}
        config_dict = config.model_dump() if hasattr(config, "model_dump") else dict(config)
        config_dict = {k: v for k, v in config_dict.items() if k not in spec.key_ignores}
        recipe_values = {f: getattr(self.recipe, f) for f in spec.recipe_fields}
        if recipe_values:
            config_dict["recipe"] = recipe_values
        input_digests = {r: f"{d}:{p.name}" for r, (p, d) in inputs.items()}
        if name == "teacher":
            input_digests["source"] = teacher_source
        key = stage_key(name, spec.version, config_dict, self.recipe.seed, input_digests)
        final = self.artifact.stage_dir(index, name, key)
        started = time.perf_counter()
        digest = None
        if final.is_dir():
            digest, problems = verify_stage(final)
            if problems:
                self.console.print(f"[yellow]{name}: cached output was modified ({problems[0]}); running it again[/]")
                shutil.rmtree(final)
                digest = None
        reused = digest is not None
        summary: dict = {}
        if reused:
            self.console.print(f"[dim]{name}: up to date ({final.name})[/]")
        else:
            self.console.print(f"[bold]{name}[/]")
            summary, digest = self._execute(spec, index, name, key, config, {r: p for r, (p, _) in inputs.items()}, final,
                                            recipe_values)
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
        from deploykit.export.bundle import manifest_sha256
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
          random_weights: bool = False) -> dict:
    """Run ``recipe``; ``random_weights`` swaps the teacher for its topology with random weights (speed only)."""
    if random_weights:
        recipe = recipe.model_copy(update={"teacher": random_weights_spec(recipe.teacher, recipe.topology)})
    return Runner(recipe, recipe_path, out, console).build()
