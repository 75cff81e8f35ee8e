"""engine: TensorRT engines of the teacher's and the student's UNet from the export stage's ONNX.

Writes ``<role>/unet/<gpu>_trt<version>_<precision>[-sparse].engine`` per role, the build log beside
each engine (``*.log``, kVERBOSE: TensorRT names there the layers eligible for sparse math and those it
ran sparse), a shared ``timing.cache`` and ``engines.json``. Sources: the fp32 graph (``onnx``) with the
FP16 flag; an INT8 QDQ graph (``onnx_int8``, from a quantize stage) for ``int8`` and, where present,
``best``. SD pipelines: the UNet only (text encoder and VAE run in ONNX Runtime or torch).

A build with this stage stops before writing anything when ``import tensorrt`` fails here
(:func:`deploykit.engines.tensorrt.tensorrt_missing`) or there is no GPU (its preflight).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from deploykit.engines.tensorrt import build_engine, engine_name, gpu_name, precision_flags, require_tensorrt, tensorrt_missing
from deploykit.errors import InputError
from deploykit.io import atomic_write_json
from deploykit.models.architecture import ARCH_NAME
from deploykit.models.io_spec import Range, UNetIO, unet_io
from deploykit.onnxtools import graph_signature
from deploykit.sparsity import MASKS_FILE
from deploykit.stages.base import Markdown, Preflight, PublishContext, ReportContext, StageConfig, StageContext, StageSpec
from deploykit.stages.bounds import ProfileBatch, ProfileSide
from deploykit.stages.data import is_pipeline, teacher_meta
from deploykit.targets import JETSON_TARGETS, ON_DEVICE

ROLES = ("teacher", "student")


def min_opt_max(v):
    """An optimization profile's (min, opt, max), as TensorRT requires them ordered."""
    if v is not None and not (1 <= v[0] <= v[1] <= v[2]):
        raise ValueError(f"needs 1 <= min <= opt <= max, got {list(v)}")
    return v


class EngineStage(StageConfig):
    """TensorRT engines of the teacher's and the student's UNet from the export stage's ONNX (needs TensorRT and a GPU).

    Profiles default to the build's shapes: batch 1..B with B optimal (bench's batch, else 2 for SD and
    32 otherwise) and the recipe's resolution fixed. ``int8`` needs an INT8 QDQ graph from a quantize
    stage (role ``onnx_int8``); ``best`` uses it where present, fp16 otherwise.
    """

    stage: Literal["engine"] = "engine"
    precision: Literal["fp16", "int8", "best"] = "fp16"
    sparse_weights: Literal["auto", "on", "off"] = Field(
        "auto", description="BuilderFlag.SPARSE_WEIGHTS: auto turns it on when the student carries 2:4 masks")
    workspace_gb: float = Field(4.0, gt=0, le=1024)
    batch: ProfileBatch | None = Field(None, description="min, opt, max batch of the optimization profile")
    resolution: ProfileSide | None = Field(
        None, description="min, opt, max image side in pixels (default: the recipe's resolution, fixed)")
    timing_cache: bool = Field(True, description="reuse tactic timings across builds (engines/timing.cache)")
    optimization_level: int = Field(3, ge=0, le=5)

    _ordered = field_validator("batch", "resolution")(min_opt_max)


def check(cfg: EngineStage, recipe) -> None:
    if recipe.target == "cpu":
        raise ValueError("engine builds TensorRT engines, which run on target cuda, not cpu")
    if recipe.target in JETSON_TARGETS:  # engines for a Jetson are built on the Jetson
        raise ValueError(f"engine builds TensorRT engines on this machine, which a {recipe.target} cannot run "
                         f"(engines are built on the device): use a bundle stage; {ON_DEVICE.format(target=recipe.target)}")


def preflight(cfg: EngineStage, pf: Preflight) -> None:
    reason = tensorrt_missing()
    if reason is None:
        import torch

        if not torch.cuda.is_available():
            reason = "TensorRT builds engines on an NVIDIA GPU and torch sees no CUDA device"
    if reason is not None:
        raise InputError(f"{pf.where}: the engine stage builds TensorRT engines here, and it cannot: {reason}; "
                         "or remove the engine stage")


def shape_ranges(cfg, meta: dict, bench_batch: int | None = None) -> tuple[Range, Range]:
    """The optimization profile's UNet batch and latent side (min, opt, max) for this build (see ``EngineStage``)."""
    pipeline = is_pipeline(meta)
    side = meta["sample_shape"][-1]
    opt_batch = bench_batch or (2 if pipeline else 32)
    batch = tuple(cfg.batch) if cfg.batch else (1, opt_batch, opt_batch)
    if cfg.resolution:
        scale = meta.get("vae_scale_factor", 1)  # pixel models have no VAE
        bad = [r for r in cfg.resolution if r % scale]
        if bad:
            raise InputError(f"engine.resolution: {bad[0]} is not a multiple of {scale} (the VAE's scale)")
        sides = tuple(r // scale for r in cfg.resolution)
    else:
        sides = (side, side, side)
    return batch, sides


def graph_unet_io(role_dir: Path, onnx_path: Path, signature: dict) -> UNetIO:
    """The description of the role's UNet as the graph at ``onnx_path`` (``signature``: its inputs) has it: the
    timestep a scalar (optimum's layout) or one per row; raises when the graph is not the UNet described."""
    config = json.loads((role_dir / "model" / ARCH_NAME).read_text())["config"]
    io = unet_io(config, scalar_timestep=signature["timestep"][1] == [])
    io.check_graph({k: dims for k, (_, dims) in signature.items()}, str(onnx_path))
    return io


def has_qdq(onnx_path: Path) -> bool:
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    return any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in graph.node)


def source_onnx(ctx: StageContext, role: str, precision: str) -> Path:
    int8 = ctx.inputs.get("onnx_int8")
    if precision in ("int8", "best") and int8 is not None and (int8 / role / "unet" / "model.onnx").is_file():
        return int8 / role / "unet" / "model.onnx"
    if precision == "int8":
        raise InputError("engine precision int8 needs an INT8 QDQ export (a quantize stage writing onnx_int8) "
                         f"of the {role}")
    return ctx.inputs["onnx"] / role / "unet" / "model.onnx"


def run(ctx: StageContext) -> dict:
    require_tensorrt()
    import tensorrt as trt

    cfg = ctx.config
    meta = teacher_meta(ctx.inputs["teacher"])
    batch, sides = shape_ranges(cfg, meta)
    gpu = gpu_name()
    cache = ctx.out / "timing.cache" if cfg.timing_cache else None
    results = {}
    for role in ROLES:
        onnx_path = source_onnx(ctx, role, cfg.precision)
        qdq = has_qdq(onnx_path)
        fp16, int8 = precision_flags(cfg.precision, qdq)
        masked = (ctx.inputs[role] / "model" / MASKS_FILE).is_file()
        sparse = cfg.sparse_weights == "on" or (cfg.sparse_weights == "auto" and masked)
        precision = "int8" if int8 else "fp16"
        name = engine_name(gpu, trt.__version__, precision, sparse)
        path = ctx.out / role / "unet" / name
        io = graph_unet_io(ctx.inputs[role], onnx_path, graph_signature(onnx_path))
        with ctx.progress(f"building the {role}'s TensorRT engine ({precision}{', sparse weights' if sparse else ''})", 1) as advance:
            built = build_engine(onnx_path, path, fp16=fp16, int8=int8, sparse_weights=sparse,
                                 profiles=io.input_profile(batch, sides), timing_cache=cache,
                                 workspace_gb=cfg.workspace_gb, log_path=path.with_suffix(".log"),
                                 optimization_level=cfg.optimization_level)
            advance(1)
        results[role] = {**built.as_dict(), "path": f"{role}/unet/{name}", "onnx": str(onnx_path.relative_to(onnx_path.parents[2])),
                         "precision": precision, "gpu": gpu, "masked": masked}
        sp = built.sparse
        ctx.console.print(f"  {role}: {name} in {built.seconds:.0f} s"
                          + (f"; sparse: {len(sp['picked'])} of {len(sp['eligible'])} eligible layers ran sparse" if sparse else ""))
    atomic_write_json(ctx.out / "engines.json", results)
    return {}


def report_section(ctx: ReportContext) -> dict:
    engines = ctx.read_json("engines.json")
    return {"engines": {role: {k: v[k] for k in ("path", "precision", "gpu", "tensorrt", "flags", "seconds", "profiles")}
                        | {"sparse_layers": {"eligible": len(v["sparse"].get("eligible", [])),
                                             "picked": len(v["sparse"].get("picked", [])),
                                             "lines": v["sparse"].get("lines", [])}}
                        for role, v in engines.items()}}


def markdown_rows(report: dict) -> Markdown | None:
    if "engines" not in report:
        return None
    lines = []
    for role, e in report["engines"].items():
        sparse = e["sparse_layers"]
        ran = (f"; sparse: {sparse['picked']} of {sparse['eligible']} eligible layers ran sparse"
               if "SPARSE_WEIGHTS" in e["flags"] else "")
        lines.append(f"TensorRT {e['tensorrt']} engine of the {role} on {e['gpu']}: `{e['path']}` ({e['precision']}, "
                     f"flags {', '.join(e['flags']) or 'none'}, built in {e['seconds']:.0f} s{ran}).")
    return Markdown(body=lines)


def publish(ctx: PublishContext) -> None:
    if (ctx.folder / "student").is_dir():
        shutil.copytree(ctx.folder / "student", ctx.into["engines"], dirs_exist_ok=True)


ENGINE = StageSpec(name="engine", version="1", config=EngineStage, reads=("teacher", "student", "onnx"),
                   optional_reads=("onnx_int8",), writes={"engines": "."}, run=run, check=check, preflight=preflight,
                   depends_on=("tensorrt", "onnx", "polygraphy"), machine=True,
                   report=report_section, markdown=markdown_rows, publish=publish)
