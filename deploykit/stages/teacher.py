"""teacher: load the dense model and fix it into the artifact (weights, metadata, FID features).

Every build runs it first; recipes do not list it: its settings are the recipe's own ``teacher`` and
``resolution``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from deploykit.artifact import digest, hash_folder
from deploykit.errors import InputError
from deploykit.io import atomic_write_json, sha256_file
from deploykit.models import count_params, load_teacher, save_model
from deploykit.models.diffusers_pipelines import save_components
from deploykit.models.teacher import check_teacher_spec, teacher_path
from deploykit.stages.base import MODEL_PACKAGES, Preflight, ReportContext, StageContext, StageSpec, StrictModel
from deploykit.stages.data import PIPELINE_DIR, TEACHER_JSON


class TeacherConfig(StrictModel):
    """The recipe's ``teacher`` and ``resolution``."""

    teacher: str
    resolution: int | None = None


def resolve(cfg: None, recipe) -> TeacherConfig:
    return TeacherConfig(teacher=recipe.teacher, resolution=recipe.resolution)


def preflight(cfg: TeacherConfig, pf: Preflight) -> None:
    check_teacher_spec(cfg.teacher, pf.recipe_dir)


def key_inputs(cfg: TeacherConfig, pf: Preflight) -> dict[str, str]:
    return {"source": source_digest(cfg.teacher, pf.recipe_dir)}


def source_digest(spec: str, base_dir: Path | None) -> str:
    """Content hash of the teacher's source files, so a retrained teacher invalidates the cache.

    A hub teacher is keyed by its id and revision (pin ``@REVISION`` for a reproducible key); a
    random-weights teacher by its topology's config.
    """
    if spec.startswith("random:"):
        from deploykit.models.topologies import topology

        return digest({"topology": json.dumps(topology(spec.removeprefix("random:")), sort_keys=True)})
    if spec.startswith("hf:"):
        return digest({"hub": spec})
    path = teacher_path(spec, base_dir)
    if not path.exists():
        raise InputError(f"teacher path does not exist: {spec}")
    return digest(hash_folder(path)) if path.is_dir() else sha256_file(path)


def run(ctx: StageContext) -> dict:
    teacher = load_teacher(ctx.config.teacher, ctx.recipe_dir, ctx.config.resolution, ctx.seed)
    if teacher.random_weights:
        ctx.console.print("  [yellow]random weights: this build measures speed, not quality[/]")
    save_model(teacher.model, ctx.out / "model")
    if teacher.pipeline is not None:
        save_components(teacher.pipeline, ctx.out / PIPELINE_DIR)
    meta = {"source": teacher.source, "kind": teacher.kind, "random_weights": teacher.random_weights,
            "dataset": teacher.dataset, "sample_shape": list(teacher.sample_shape),
            "scheduler_config": teacher.scheduler_config, "params": count_params(teacher.model), **teacher.info}
    atomic_write_json(ctx.out / TEACHER_JSON, meta)
    if teacher.source.startswith("zoo:"):
        from deploykit.zoo import get_entry

        entry = get_entry(teacher.source.removeprefix("zoo:"))
        for name in entry.eval_files:  # the zoo's FID features / attribute classifier, for eval
            shutil.copyfile(entry.folder / name, ctx.out / name)
    return {"params": meta["params"]}


def report_section(ctx: ReportContext) -> dict:
    meta = ctx.read_json(TEACHER_JSON)
    out = {"teacher_source": meta.get("source"), "teacher_kind": meta.get("kind", "pixel"),
           "random_weights": bool(meta.get("random_weights"))}
    if "resolution" in meta:
        out["resolution"] = meta["resolution"]
    return out


TEACHER = StageSpec(name="teacher", version="2", config=TeacherConfig, implicit=True, writes={"teacher": "."}, run=run,
                    depends_on=(*MODEL_PACKAGES, "safetensors"), resolve=resolve, preflight=preflight, key_inputs=key_inputs,
                    report=report_section)
