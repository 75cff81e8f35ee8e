"""verify: the same inputs through torch, ONNX Runtime and TensorRT, compared with polygraphy.

Per role (teacher, student), the torch model is the reference for each comparison:

- ``onnxruntime-fp32``: the fp32 ONNX graph (tolerances ``fp32_atol`` / ``fp32_rtol``, tight);
- ``onnxruntime-fp16``: the fp16 graph, where the export wrote one (``fp16_*``, loose);
- ``onnxruntime-int8``: the INT8 QDQ graph, where a quantize stage wrote one (``int8_*``, looser);
- ``tensorrt``: the engine stage's engine, where there is one and ``tensorrt`` imports here (``fp16_*``
  or ``int8_*`` by the engine's precision); otherwise recorded as skipped, with the reason.

A masked student (2:4 sparsity) is also checked to still be 2:4 in every masked layer. Results go to
``verify.json`` and the report; any failure is a DeployKitError naming the comparison, the worst
output and its error. SD pipelines: the UNet.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import Field

from deploykit.engines.tensorrt import tensorrt_missing
from deploykit.errors import DeployKitError
from deploykit.export import compare_with_torch
from deploykit.io import atomic_write_json
from deploykit.models import load_model
from deploykit.models.inputs import unet_input_names, unet_of
from deploykit.models.io_spec import unet_io
from deploykit.models.wrappers import TensorOutput
from deploykit.onnxtools import adapt_feed, compare_runners, graph_signature
from deploykit.sparsity import MASKS_FILE, check_2to4, load_masks
from deploykit.stages.base import MODEL_PACKAGES, ONNX_PACKAGES, Markdown, ReportContext, StageConfig, StageContext, StageSpec
from deploykit.stages.bounds import Tolerance
from deploykit.stages.data import example_inputs, teacher_meta
from deploykit.stages.footprint import Demand, Footprint

ROLES = ("teacher", "student")


class VerifyStage(StageConfig):
    """torch vs ONNX Runtime (fp32, and the fp16 graph where exported) vs TensorRT engines, with polygraphy."""

    stage: Literal["verify"] = "verify"
    batches: int = Field(2, ge=1, le=100, description="input batches compared")
    batch_size: int = Field(2, ge=1, le=256)
    fp32_atol: Tolerance = 1e-4
    fp32_rtol: Tolerance = 1e-3
    fp16_atol: Tolerance = 5e-2
    fp16_rtol: Tolerance = 5e-2
    int8_atol: Tolerance = 2e-1
    int8_rtol: Tolerance = 2e-1
    check_sparsity: bool = Field(True, description="check that a masked student's weights are still 2:4")


def memory(cfg: VerifyStage, fp: Footprint) -> list[Demand]:
    return [Demand("verify.batch_size x resolution", fp.unet_call(cfg.batch_size, materialized_attention=True),
                   "a UNet call of the comparison, in ONNX Runtime")]


def tolerance(cfg, precision: str) -> dict:
    return {"atol": getattr(cfg, f"{precision}_atol"), "rtol": getattr(cfg, f"{precision}_rtol")}


def compare_engine(model, engine_path: Path, onnx_path: Path, feeds: list[dict], atol: float, rtol: float) -> dict:
    """torch vs a TensorRT engine built from ``onnx_path`` (whose signature says the engine's input dtypes)."""
    from deploykit.engines.tensorrt import trt_runner
    from deploykit.onnxtools.torch_runner import TorchRunner

    signature = graph_signature(onnx_path)
    adapted = [adapt_feed(f, signature) for f in feeds]
    outputs = list(unet_io(model).output_names())
    runners = [TorchRunner(TensorOutput(unet_of(model)).eval(), signature, outputs), trt_runner(engine_path, "tensorrt")]
    return compare_runners(runners, adapted, atol, rtol)


def _onnx_variants(ctx: StageContext, role: str) -> list[tuple[str, str, Path]]:
    out = [("onnxruntime-fp32", "fp32", ctx.inputs["onnx"] / role / "unet" / "model.onnx"),
           ("onnxruntime-fp16", "fp16", ctx.inputs["onnx"] / f"{role}-fp16" / "unet" / "model.onnx")]
    if "onnx_int8" in ctx.inputs:
        out.append(("onnxruntime-int8", "int8", ctx.inputs["onnx_int8"] / role / "unet" / "model.onnx"))
    return [v for v in out if v[2].is_file()]


def run(ctx: StageContext) -> dict:
    cfg = ctx.config
    meta = teacher_meta(ctx.inputs["teacher"])
    engines = json.loads((ctx.inputs["engines"] / "engines.json").read_text()) if "engines" in ctx.inputs else None
    missing = tensorrt_missing() if engines else None
    results: dict = {"roles": {}, "skipped": {}}
    for role in ROLES:
        model = load_model(ctx.inputs[role] / "model")
        names = unet_input_names(model)
        feeds = [dict(zip(names, (x.numpy() for x in example_inputs(meta, model, cfg.batch_size, ctx.seed + 2 + i))))
                 for i in range(cfg.batches)]
        checks: dict = {}
        for name, precision, path in _onnx_variants(ctx, role):
            checks[name] = {"precision": precision, **compare_with_torch(model, path, feeds, **tolerance(cfg, precision))}
        if engines is None:
            results["skipped"][f"{role}/tensorrt"] = "no engine stage in this build"
        elif missing is not None:
            results["skipped"][f"{role}/tensorrt"] = missing
        else:
            entry = engines[role]
            onnx_path = _engine_source(ctx, entry)
            checks["tensorrt"] = {"precision": entry["precision"], "engine": entry["path"],
                                  **compare_engine(model, ctx.inputs["engines"] / entry["path"], onnx_path, feeds,
                                                   **tolerance(cfg, entry["precision"]))}
        masks_path = ctx.inputs[role] / "model" / MASKS_FILE
        if cfg.check_sparsity and masks_path.is_file():
            masks = load_masks(masks_path)
            bad = check_2to4(unet_of(model), list(masks))
            checks["sparsity-2:4"] = {"passed": not bad, "layers": len(masks), "message":
                                      "; ".join(map(str, bad[:5])) if bad else f"all {len(masks)} masked layers are 2:4"}
        for name, c in checks.items():
            ctx.console.print(f"  {role} {name}: {c['message']}")
        results["roles"][role] = checks
    for key, reason in results["skipped"].items():
        ctx.console.print(f"  [dim]{key}: skipped ({reason.split(';')[0]})[/]")
    atomic_write_json(ctx.out / "verify.json", results)
    failed = [(role, name, c) for role, checks in results["roles"].items() for name, c in checks.items() if not c["passed"]]
    if failed:
        role, name, c = max(failed, key=lambda f: f[2].get("max_abs_error", float("inf")))
        others = f" (and {len(failed) - 1} more)" if len(failed) > 1 else ""
        where = f"worst output {c['worst_output']!r}: max |diff| {c['max_abs_error']:.3g}, " \
                f"max rel {c['max_rel_error']:.3g} at atol {c['atol']:g}, rtol {c['rtol']:g}" if "worst_output" in c else c["message"]
        raise DeployKitError(f"verify: {role} {name} vs torch differs beyond tolerance{others}: {where} "
                             "(see the verify stage's verify.json)")
    return {f"{r}/{n}": c["passed"] for r, checks in results["roles"].items() for n, c in checks.items()}


def _engine_source(ctx: StageContext, entry: dict) -> Path:
    """The ONNX file an engine was built from (``onnx`` or ``onnx_int8``), by the path engines.json records."""
    for role in ("onnx_int8", "onnx"):
        if role in ctx.inputs and (ctx.inputs[role] / entry["onnx"]).is_file():
            return ctx.inputs[role] / entry["onnx"]
    raise DeployKitError(f"verify: the ONNX source {entry['onnx']} of engine {entry['path']} is missing")


def report_section(ctx: ReportContext) -> dict:
    verify = ctx.read_json("verify.json")
    fields = ("passed", "precision", "max_abs_error", "max_rel_error", "worst_output", "atol", "rtol", "message")
    return {"verify": {"checks": {f"{role}/{name}": {k: c.get(k) for k in fields}
                                  for role, checks in verify["roles"].items() for name, c in checks.items()},
                       "skipped": verify["skipped"]}}


def markdown_rows(report: dict) -> Markdown | None:
    if "verify" not in report:
        return None
    v = report["verify"]
    checks = ", ".join(f"{k} {'ok' if c['passed'] else 'FAILED'}"
                       + (f" (max |diff| {c['max_abs_error']:.1e})" if c.get("max_abs_error") is not None else "")
                       for k, c in v["checks"].items())
    return Markdown(body=[f"Verify (polygraphy, torch as reference): {checks}."
                          + (" Skipped: " + "; ".join(f"{k}: {r.split(';')[0]}" for k, r in v["skipped"].items()) + "."
                             if v["skipped"] else "")])


VERIFY = StageSpec(name="verify", version="1", config=VerifyStage, reads=("teacher", "student", "onnx"),
                   optional_reads=("engines", "onnx_int8"), writes={"verify": "."}, run=run,
                   depends_on=(*MODEL_PACKAGES, *ONNX_PACKAGES, "tensorrt"), memory=memory, report=report_section,
                   markdown=markdown_rows)
