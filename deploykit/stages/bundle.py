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

import numpy as np
import torch

from deploykit import __version__
from deploykit.device.bundle import FORMAT, copy_folder, finish, link_or_copy
from deploykit.errors import InputError
from deploykit.models.io_spec import ComponentIO, Range, VAEDecoderIO, pipeline_component_io
from deploykit.onnxtools import graph_signature
from deploykit.sparsity import MASKS_FILE
from deploykit.stages.base import StageContext, StageSpec
from deploykit.stages.data import example_inputs, is_pipeline, teacher_meta
from deploykit.stages.engine import graph_unet_io, has_qdq, shape_ranges

ROLES = ("teacher", "student")
ONNX = "model.onnx"


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


BUNDLE = StageSpec(name="bundle", version="2", reads=("teacher", "student", "onnx"), optional_reads=("onnx_int8",),
                   writes={"bundle": "."}, run=run, recipe_fields=("target", "name"))
