"""bundle: a self-contained folder a Jetson builds its TensorRT engines from, and times and serves them with.

Reads the export stage's graphs (fp32, or fp16 with ``bundle.onnx: fp16``; a quantize stage's INT8 QDQ
UNets for ``precision: int8`` / ``best``), writes them with the engine settings and optimization profiles
the device's build needs, the build script, ``run.py`` and a roofline estimate for the recipe's target
(see :mod:`deploykit.device.bundle`). Nothing here needs TensorRT: the engines are built on the device,
by ``build_engines.sh`` or by ``deploykit bench ARTIFACT --host user@device``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import Field, field_validator

from deploykit import __version__
from deploykit.artifact import FILES_JSON
from deploykit.device.bundle import FORMAT, copy_folder, finish, link_or_copy
from deploykit.errors import InputError
from deploykit.models.io_spec import ComponentIO, Range, VAEDecoderIO, pipeline_component_io
from deploykit.onnxtools import graph_signature
from deploykit.sparsity import MASKS_FILE
from deploykit.stages.base import (
    MODEL_PACKAGES,
    ONNX_PACKAGES,
    Markdown,
    PublishContext,
    ReportContext,
    StageConfig,
    StageContext,
    StageSpec,
)
from deploykit.stages.bounds import BatchSize, ProfileBatch, ProfileSide, Runs, Warmup
from deploykit.stages.data import example_inputs, is_pipeline, teacher_meta
from deploykit.stages.engine import graph_unet_io, has_qdq, min_opt_max, shape_ranges
from deploykit.targets import JETSON_TARGETS, ON_DEVICE

ROLES = ("teacher", "student")
ONNX = "model.onnx"


class BundleStage(StageConfig):
    """A self-contained bundle for a Jetson (``bundle/`` in the artifact): the exported ONNX graphs, a script that
    builds TensorRT engines on the device with its own TensorRT, and ``run.py``, which benchmarks teacher against
    student and serves the student with no deploykit installed. ``deploykit bench ARTIFACT --host user@device``
    copies it over SSH, builds, runs and brings the figures back.

    Engine settings mean what they mean in the engine stage; the profiles default to the build's shapes
    (batch 1..B with B optimal, the recipe's resolution fixed).
    """

    stage: Literal["bundle"] = "bundle"
    precision: Literal["fp16", "int8", "best"] = Field(
        "fp16", description="TensorRT precision: int8 needs a quantize stage's INT8 QDQ UNets; best uses them where present")
    sparse_weights: Literal["auto", "on", "off"] = Field(
        "auto", description="BuilderFlag.SPARSE_WEIGHTS (trtexec --sparsity=enable): auto turns it on for a model "
                            "carrying 2:4 masks")
    onnx: Literal["fp32", "fp16"] = Field(
        "fp32", description="graphs shipped: fp32 (TensorRT builds fp16 from it with the FP16 flag; what the "
                            "onnxruntime-cpu stand-in runs) or fp16 (half the bytes to copy and for TensorRT to parse: "
                            "8 GB devices; needs export.fp16)")
    pipeline: bool = Field(True, description="SD: also ship the student's text encoder, VAE decoder, tokenizer and "
                                             "scheduler, so that `run.py serve` makes images (false: UNets only)")
    batch_size: BatchSize | None = Field(
        None, description="UNet batch of run.py bench (default: 2 for SD, classifier-free guidance; 32 otherwise)")
    batch: ProfileBatch | None = Field(None, description="min, opt, max batch of the engines' optimization profile")
    resolution: ProfileSide | None = Field(
        None, description="min, opt, max image side in pixels of the profile (default: the recipe's resolution, fixed)")
    workspace_gb: float = Field(2.0, gt=0, le=1024, description="TensorRT builder workspace on the device")
    optimization_level: int = Field(3, ge=0, le=5)
    timing_cache: bool = Field(True, description="reuse tactic timings across builds on the device (engines/timing.cache)")
    warmup: Warmup = Field(10, description="run.py bench: warm-up pairs")
    runs: Runs = Field(50, description="run.py bench: timed teacher / student pairs")

    _ordered = field_validator("batch", "resolution")(min_opt_max)


def check(cfg: BundleStage, recipe) -> None:
    if recipe.target not in JETSON_TARGETS:
        raise ValueError(f"bundle makes an on-device bundle for a Jetson target ({', '.join(JETSON_TARGETS)}); "
                         f"target {recipe.target} builds and times on this machine (engine / bench stages)")
    export = recipe.stage("export")
    if cfg.onnx == "fp16" and export is not None and not export.fp16:
        raise ValueError("bundle.onnx fp16 ships the fp16 graphs: set export.fp16: true")
    if cfg.precision == "int8" and recipe.stage("quantize") is None:
        raise ValueError("bundle.precision int8 needs INT8 QDQ UNets: add a quantize stage before the bundle")


def required(recipe) -> str | None:
    """Engines for a Jetson are built on the Jetson, from the bundle."""
    if recipe.target in JETSON_TARGETS:
        return f"target {recipe.target} needs a bundle stage (after export): {ON_DEVICE.format(target=recipe.target)}"
    return None


def _source_dir(ctx: StageContext, role: str) -> Path:
    folder = ctx.inputs["onnx"] / (f"{role}-fp16" if ctx.config.onnx == "fp16" else role)
    if not folder.is_dir():
        raise InputError(f"bundle: no {ctx.config.onnx} ONNX export of the {role} (bundle.onnx fp16 needs export.fp16: true)")
    return folder


def _unet_source(ctx: StageContext, role: str) -> tuple[Path, bool]:
    """The UNet folder to ship and whether it is an INT8 QDQ graph."""
    cfg = ctx.config
    int8 = ctx.inputs.get("onnx_int8")
    if cfg.precision in ("int8", "best") and int8 is not None and (int8 / role / "unet" / ONNX).is_file():
        return int8 / role / "unet", True
    if cfg.precision == "int8":
        raise InputError(f"bundle precision int8 needs an INT8 QDQ export of the {role} (a quantize stage)")
    return _source_dir(ctx, role) / "unet", False


def _component(ctx: StageContext, src: Path, dest: str, io: ComponentIO, signature: dict, batch: Range, side: Range,
               image_side: int, int8: bool, sparse: bool) -> dict:
    """Ship the component folder ``src`` (graph, external data, config) as ``onnx/<dest>/``; its profile, and its
    inputs and outputs as the device scripts feed and read them (``io``: its description; ``signature``: the graph's
    inputs, whose dtypes the device feeds)."""
    copy_folder(src, ctx.out / "onnx" / dest)
    onnx_path = src / ONNX
    io.check_graph({k: dims for k, (_, dims) in signature.items()}, str(onnx_path))
    return {"onnx": f"onnx/{dest}/{ONNX}", "int8": int8 and has_qdq(onnx_path), "sparse": sparse,
            "inputs": [{**feed, "dtype": np.dtype(signature[feed["name"]][0]).name}
                       for feed in io.feeds(batch, side, image_side)],
            "outputs": [{"name": t.name, "role": t.role} for t in io.outputs()],
            "profile": {k: [list(s) for s in v] for k, v in io.input_profile(batch, side).items()}}


def _meta_model(folder: Path) -> torch.nn.Module:
    """The model's architecture on the meta device, in fp16: shapes are all the roofline needs."""
    from deploykit.models.architecture import ARCH_NAME, build

    with torch.device("meta"):
        model = build(json.loads((folder / ARCH_NAME).read_text()))
    return model.to(torch.float16).eval()


def _estimate(ctx: StageContext, meta: dict, batch: int, components: dict) -> dict | None:
    """The roofline estimate of one UNet call on the target's GPU (data-sheet peaks), teacher and student."""
    from deploykit.bench.roofline import DEVICES, TARGET_DEVICES, device_record, estimate, op_costs
    from deploykit.sparsity import load_masks

    key = TARGET_DEVICES.get(ctx.recipe.get("target", ""))
    if key is None:
        return None
    device = DEVICES[key]
    out: dict = {"target": ctx.recipe["target"], "device": device_record(device)}
    for role in ROLES:
        model = _meta_model(ctx.inputs[role] / "model")
        inputs = tuple(x.to("meta", torch.float16) if x.is_floating_point() else x.to("meta")
                       for x in example_inputs(meta, model, batch, ctx.seed))
        spec = components[f"{role}/unet"]
        masks = ctx.inputs[role] / "model" / MASKS_FILE
        sparse = list(load_masks(masks, check=False)) if spec["sparse"] and masks.is_file() else []
        precision = "int8" if spec["int8"] else "fp16"
        out["precision"] = precision
        out[role] = {**estimate(op_costs(model, inputs), device, precision, sparse_layers=sparse), "sparse_layers": len(sparse)}
    out["speedup"] = out["teacher"]["ms"] / out["student"]["ms"]
    return out


def run(ctx: StageContext) -> dict:
    cfg = ctx.config
    meta = teacher_meta(ctx.inputs["teacher"])
    pipeline = is_pipeline(meta)
    batch = cfg.batch_size or (2 if pipeline else 32)
    batches, sides = shape_ranges(cfg, meta, batch)
    image_side = meta.get("resolution") or meta["sample_shape"][-1]
    components: dict = {}
    for role in ROLES:
        src, int8 = _unet_source(ctx, role)
        masked = (ctx.inputs[role] / "model" / MASKS_FILE).is_file()
        sparse = cfg.sparse_weights == "on" or (cfg.sparse_weights == "auto" and masked)
        signature = graph_signature(src / ONNX)
        io = graph_unet_io(ctx.inputs[role], src / ONNX, signature)
        components[f"{role}/unet"] = _component(ctx, src, f"{role}/unet", io, signature, batches, sides, image_side, int8,
                                                sparse)
    bench_inputs = components["teacher/unet"]["inputs"]
    manifest: dict = {
        "format": FORMAT, "deploykit": __version__, "recipe": ctx.recipe.get("name"), "target": ctx.recipe.get("target"),
        "kind": meta.get("kind", "pixel"), "resolution": meta.get("resolution"), "batch": batch,
        "engine": {"precision": cfg.precision, "sparse_weights": cfg.sparse_weights, "workspace_gb": cfg.workspace_gb,
                   "optimization_level": cfg.optimization_level, "timing_cache": cfg.timing_cache},
        "bench": {"inputs": bench_inputs, "warmup": cfg.warmup, "runs": cfg.runs, "onnx_precision": cfg.onnx},
        "pipeline": None,
    }
    if pipeline:
        scheduler_config = {k: v for k, v in meta["scheduler_config"].items() if not k.startswith("_")}
        manifest["scheduler"] = {"config": scheduler_config, "clip_sample": scheduler_config.get("clip_sample", False),
                                 "set_alpha_to_one": scheduler_config.get("set_alpha_to_one", False)}
    else:  # pixel UNets sample as deploykit.runtime.sampling.make_scheduler configures DDIM
        kept = ("num_train_timesteps", "beta_schedule", "beta_start", "beta_end", "prediction_type")
        manifest["scheduler"] = {"config": {k: v for k, v in meta["scheduler_config"].items() if k in kept},
                                 "clip_sample": True, "set_alpha_to_one": True}
    if pipeline and cfg.pipeline and meta.get("kind") == "sdxl":
        ctx.console.print("  [yellow]bundle: SDXL bundles ship the UNets only (run.py serves SD 1.x / 2.x pipelines)[/]")
    elif pipeline and cfg.pipeline:
        student = _source_dir(ctx, "student")
        for name in ("text_encoder", "vae_decoder"):
            io = pipeline_component_io(name, json.loads((student / name / "config.json").read_text()), sdxl=False)
            components[f"student/{name}"] = _component(ctx, student / name, f"student/{name}", io,
                                                       graph_signature(student / name / ONNX), batches, sides, image_side,
                                                       False, False)
        copy_folder(student / "tokenizer", ctx.out / "onnx" / "student" / "tokenizer")
        link_or_copy(student / "scheduler" / "scheduler_config.json", ctx.out / "onnx" / "student" / "scheduler_config.json")
        vae = VAEDecoderIO(json.loads((student / "vae_decoder" / "config.json").read_text()))
        manifest["pipeline"] = {"tokenizer": "onnx/student/tokenizer", "vae_scaling_factor": vae.scaling_factor,
                                "vae_scale": vae.scale_factor}
    manifest["components"] = components
    manifest["estimate"] = _estimate(ctx, meta, batch, components)
    written = finish(ctx.out, manifest)
    size = sum((ctx.out / f).stat().st_size for f in written["files"])
    est = written["estimate"]
    ctx.console.print(f"  bundle: {len(components)} graphs ({', '.join(components)}), {size / 2**20:.1f} MiB"
                      + (f"; roofline on the {est['target']}: teacher {est['teacher']['ms']:.2f} ms, student "
                         f"{est['student']['ms']:.2f} ms per UNet call ({est['speedup']:.2f}x)" if est else ""))
    return {"files": len(written["files"])}


def report_section(ctx: ReportContext) -> dict:
    bundle = ctx.read_json("bundle.json")
    return {"bundle": {"target": bundle["target"], "files": len(bundle["files"]), "engine": bundle["engine"],
                       "components": {c: {"onnx": v["onnx"], "int8": v["int8"], "sparse": v["sparse"]}
                                      for c, v in bundle["components"].items()},
                       "serves": bundle["kind"] == "pixel" or bool(bundle.get("pipeline")),
                       "estimate": bundle.get("estimate")}}


def markdown_rows(report: dict) -> Markdown | None:
    if "bundle" not in report:
        return None
    b = report["bundle"]
    sparse = [c for c, v in b["components"].items() if v["sparse"]]
    est = b.get("estimate")
    return Markdown(body=[
        f"Device bundle `bundle/` for the {b['target']}: {', '.join(b['components'])} as ONNX, built into "
        f"TensorRT {b['engine']['precision']} engines on the device by its build_engines.sh"
        + (f" (2:4 sparse weights: {', '.join(sparse)})" if sparse else "")
        + f"; run.py times teacher against student there{' and serves the student' if b['serves'] else ''}. "
        "`deploykit bench ARTIFACT --host user@device` runs it over SSH."
        + (f" Roofline estimate on the {est['device']['name']} ({est['precision']}): teacher {est['teacher']['ms']:.2f} ms, "
           f"student {est['student']['ms']:.2f} ms per UNet call ({est['speedup']:.2f}x)." if est else "")])


def publish(ctx: PublishContext) -> None:
    copy_folder(ctx.folder, ctx.into["bundle"], skip=(FILES_JSON,))


BUNDLE = StageSpec(name="bundle", version="2", config=BundleStage, reads=("teacher", "student", "onnx"),
                   optional_reads=("onnx_int8",), writes={"bundle": "."}, run=run, recipe_fields=("target", "name"),
                   depends_on=(*MODEL_PACKAGES, *ONNX_PACKAGES),
                   check=check, required=required, report=report_section, markdown=markdown_rows, publish=publish)
