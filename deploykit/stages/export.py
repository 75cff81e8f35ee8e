"""export: teacher and student to ONNX, each checked against torch with polygraphy.

Pixel UNets export alone (``<role>/unet/model.onnx``); SD / SDXL UNets export with their whole
pipeline in optimum's layout (``<role>/{text_encoder,unet,vae_decoder,...}``), fp32 always (what CPU
backends run) and fp16 beside it (``<role>-fp16/``) when the recipe asks. After a decoder stage the
student's ``vae_decoder`` is its smaller decoder (same inputs, outputs and config.json). A 2:4 student's masked
weights are looked up in each of its UNet graphs and checked to be 2:4 there too.
"""

from __future__ import annotations

import multiprocessing
import shutil
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Literal

from pydantic import Field

from deploykit.errors import DeployKitError
from deploykit.export import compare_with_torch, export_pipeline, export_unet
from deploykit.io import atomic_write_json
from deploykit.models import load_model
from deploykit.models.inputs import unet_input_names
from deploykit.sparsity import MASKS_FILE, load_masks
from deploykit.sparsity.onnx_check import check_onnx_2to4
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
from deploykit.stages.bounds import Tolerance
from deploykit.stages.data import DECODER_ROLE, example_inputs, is_pipeline, load_teacher_pipeline, teacher_meta
from deploykit.stages.footprint import Demand, Footprint

ONNX_NAME = "model.onnx"
# fp16 graphs are compared with the fp32 torch model: their error is fp16 rounding through the network
FP16_TOLERANCE = {"atol": 5e-2, "rtol": 5e-2}


class ExportStage(StageConfig):
    """ONNX export of teacher and student (whole SD pipelines in optimum's layout), checked with polygraphy."""

    stage: Literal["export"] = "export"
    opset: int = Field(17, ge=13, le=23)
    fp16: bool = Field(False, description="fp16 graphs (for GPUs; the fp32 graph is what CPU backends run)")
    atol: Tolerance = 1e-4
    rtol: Tolerance = 1e-3
    check_batch: int = Field(4, ge=1, le=256)


def memory(cfg: ExportStage, fp: Footprint) -> list[Demand]:
    return [Demand("export.check_batch x resolution", fp.unet_call(cfg.check_batch, materialized_attention=True),
                   "a UNet call of the check, in ONNX Runtime")]


def _export_pipeline_files(teacher_dir: str, model_dir: str, out: str, fp16: bool, opset: int,
                           decoder_dir: str | None = None) -> dict:
    pipe = load_teacher_pipeline(Path(teacher_dir), load_model(Path(model_dir)))
    if decoder_dir is not None:  # a decoder stage's smaller VAE decoder: the student pipeline ships with it
        from deploykit.models.vae_decoder import use_decoder

        use_decoder(pipe.vae, decoder_dir)
    return export_pipeline(pipe, Path(out), fp16=fp16, opset=opset)


def _isolated(fn, *args):
    """Run ``fn`` in a fresh process. Exporting whole SD pipelines leaves process state behind that
    slowed later torch inference in the same process 2-5x (SD1.5 UNet at 256x256: 4.8 s -> 8.6 s
    dense, 2.0 s -> 10.3 s pruned), which the bench stage that follows would measure."""
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def run(ctx: StageContext) -> dict:
    cfg = ctx.config
    meta = teacher_meta(ctx.inputs["teacher"])
    results = {}
    for role in ("teacher", "student"):
        model = load_model(ctx.inputs[role] / "model")
        names = unet_input_names(model)
        check = [dict(zip(names, (x.numpy() for x in example_inputs(meta, model, cfg.check_batch, ctx.seed + 1))))]
        variants = [(role, False)] + ([(f"{role}-fp16", True)] if cfg.fp16 else [])
        masks_path = ctx.inputs[role] / "model" / MASKS_FILE
        # a 2:4 model's masked weights, looked up in each of its graphs below
        masked = ({n: model.get_submodule(n).weight for n in load_masks(masks_path, check=False)}
                  if masks_path.is_file() else {})
        for name, fp16 in variants:
            path = ctx.out / name / "unet" / ONNX_NAME
            with ctx.progress(f"exporting {name}", 1) as advance:
                if is_pipeline(meta):
                    decoder = ctx.inputs.get(DECODER_ROLE) if role == "student" else None
                    summary = _isolated(_export_pipeline_files, str(ctx.inputs["teacher"]), str(ctx.inputs[role] / "model"),
                                        str(ctx.out / name), fp16, cfg.opset, decoder and str(decoder))
                    files = {c: v["files"] for c, v in summary["components"].items()}
                else:
                    export_unet(model, path, example_inputs(meta, model, 2, ctx.seed), opset=cfg.opset, fp16=fp16)
                    files = {"unet": {ONNX_NAME: path.stat().st_size}}
                advance(1)
            tol = FP16_TOLERANCE if fp16 else {"atol": cfg.atol, "rtol": cfg.rtol}
            result = compare_with_torch(model, path, check, **tol)
            results[name] = {"path": f"{name}/unet/{ONNX_NAME}", "opset": cfg.opset, "precision": "fp16" if fp16 else "fp32",
                             "files": files, "check": result}
            ctx.console.print(f"  {name}: ONNX Runtime vs torch max |diff| {result['max_abs_error']:.2e} "
                              f"({'ok' if result['passed'] else 'FAILED'} at atol {tol['atol']:g}, rtol {tol['rtol']:g})")
            if masked:
                sparsity = check_onnx_2to4(path, masked)
                results[name]["sparsity"] = {**sparsity.as_dict(), "path": results[name]["path"]}
                ctx.console.print(f"  {name}: {sparsity.compliant} of {sparsity.layers} masked weights 2:4 in the graph")
                if not sparsity.passed:
                    raise DeployKitError(f"2:4 lost in export: {sparsity.message()}")
    atomic_write_json(ctx.out / "export.json", results)
    failed = [r for r, v in results.items() if not v["check"]["passed"]]
    if failed:
        worst = max(failed, key=lambda r: results[r]["check"]["max_abs_error"])
        raise DeployKitError(f"ONNX output of {', '.join(failed)} differs from torch beyond tolerance: "
                             f"{results[worst]['check'].get('message', '')} (see the export stage's export.json)")
    return {}


def report_section(ctx: ReportContext) -> dict:
    export = ctx.read_json("export.json")
    out: dict = {"export": {name: v["check"] for name, v in export.items()}}
    checks = {name: v["sparsity"] for name, v in export.items() if "sparsity" in v}
    if checks:
        out["sparsity"] = {"onnx": {name: {k: c[k] for k in ("layers", "compliant", "passed")} for name, c in checks.items()}}
    return out


def markdown_rows(report: dict) -> Markdown | None:
    if "export" not in report:
        return None
    checks = ", ".join(f"{name} max |diff| {c['max_abs_error']:.1e}" for name, c in report["export"].items())
    return Markdown(body=[f"ONNX vs torch (polygraphy, ONNX Runtime CPU): {checks}."])


def publish(ctx: PublishContext) -> None:
    """The student in the recipe's export precision: fp16 where it was asked for."""
    fp16 = ctx.folder / "student-fp16"
    shutil.copytree(fp16 if fp16.is_dir() else ctx.folder / "student", ctx.into["onnx"], dirs_exist_ok=True)


EXPORT = StageSpec(name="export", version="2", config=ExportStage, reads=("teacher", "student"), writes={"onnx": "."},
                   optional_reads=(DECODER_ROLE,), run=run, depends_on=(*MODEL_PACKAGES, *ONNX_PACKAGES), memory=memory,
                   report=report_section, markdown=markdown_rows, publish=publish)
