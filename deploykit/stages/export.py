"""export: teacher and student UNets to ONNX, each checked against torch with polygraphy."""

from __future__ import annotations

from deploykit.errors import DeployKitError
from deploykit.export import compare_with_torch, export_unet
from deploykit.io import atomic_write_json
from deploykit.models import load_model
from deploykit.stages.base import StageContext, StageSpec
from deploykit.stages.data import example_inputs, teacher_meta

ONNX_NAME = "model.onnx"


def run(ctx: StageContext) -> dict:
    cfg = ctx.config
    meta = teacher_meta(ctx.inputs["teacher"])
    x, t = example_inputs(meta, 2, ctx.seed)
    check_x, check_t = example_inputs(meta, cfg.check_batch, ctx.seed + 1)
    check = [{"sample": check_x.numpy(), "timestep": check_t.numpy()}]
    results = {}
    for role in ("teacher", "student"):
        model = load_model(ctx.inputs[role] / "model")
        path = export_unet(model, ctx.out / role / "unet" / ONNX_NAME, (x, t), opset=cfg.opset)
        results[role] = {"path": f"{role}/unet/{ONNX_NAME}", "opset": cfg.opset,
                         "check": compare_with_torch(model, path, check, cfg.atol, cfg.rtol)}
        c = results[role]["check"]
        ctx.console.print(f"  {role}: ONNX Runtime vs torch max |diff| {c['max_abs_error']:.2e} "
                          f"({'ok' if c['passed'] else 'FAILED'} at atol {cfg.atol:g}, rtol {cfg.rtol:g})")
    atomic_write_json(ctx.out / "export.json", results)
    failed = [r for r, v in results.items() if not v["check"]["passed"]]
    if failed:
        raise DeployKitError(f"ONNX output of {', '.join(failed)} differs from torch beyond tolerance "
                             f"(max |diff| {max(results[r]['check']['max_abs_error'] for r in failed):.3g}); "
                             "see the export stage's export.json")
    return {}


EXPORT = StageSpec(name="export", version="1", reads=("teacher", "student"), writes={"onnx": "."}, run=run)
