"""quantize: INT8 teacher and student UNets from the exported ONNX graphs, calibrated on the teacher's sampling.

Writes ``<role>/unet/model.onnx`` (QDQ INT8; SD UNets over 2 GB get ``model.onnx_data`` beside it) for
the student and, unless ``teacher: false``, the teacher, plus ``quantize.json`` (calibration set, layers
quantized and kept float, the INT8 output's error against the fp32 graph). Only the UNet is quantized:
for Stable Diffusion the artifact's ``onnx_int8/`` is the student's fp32 pipeline folder with this UNet
in place of the fp32 one, loadable by optimum's ``ORTStableDiffusionPipeline``.
"""

from __future__ import annotations

import torch

from deploykit.io import atomic_write_json
from deploykit.models import load_model
from deploykit.models.inputs import unet_input_names, unet_of
from deploykit.models.wrappers import TensorOutput
from deploykit.quantize.calibration import RecordingDenoiser, forward_loop, record_unet_calls, summarize
from deploykit.quantize.onnx_int8 import OrtInt8Config, int8_layers, output_error, qdq_counts, quantize_onnx
from deploykit.runtime import TorchBackend, cpu_threads, make_pipeline_scheduler, make_scheduler
from deploykit.runtime.sampling import sample
from deploykit.stages.base import StageContext, StageSpec
from deploykit.stages.data import example_inputs, is_pipeline, load_teacher_pipeline, teacher_meta

ONNX_NAME = "model.onnx"
CALIBRATION_SEED_OFFSET = 7919  # calibration noise / generators differ from eval's (which uses the build seed)
ERROR_BATCHES = 4  # calibration batches on which the INT8 output is compared with fp32


def _pixel_batches(ctx: StageContext, meta: dict, teacher) -> tuple[list, dict]:
    cfg = ctx.config
    names = unet_input_names(teacher)
    noise = torch.randn(cfg.calibration_samples, *meta["sample_shape"],
                        generator=torch.Generator().manual_seed(ctx.seed + CALIBRATION_SEED_OFFSET))
    recorder = RecordingDenoiser(TorchBackend(teacher), names)
    with ctx.progress("recording the teacher's trajectories", cfg.calibration_steps) as advance:
        sample(recorder, make_scheduler(cfg.scheduler, meta["scheduler_config"]), noise, cfg.calibration_steps, advance)
    return recorder.batches, {"source": "teacher sampling from Gaussian noise", "trajectories": cfg.calibration_samples}


def _pipeline_batches(ctx: StageContext, meta: dict, teacher) -> tuple[list, dict]:
    cfg = ctx.config
    pipe = load_teacher_pipeline(ctx.inputs["teacher"], teacher)
    pipe.scheduler = make_pipeline_scheduler(cfg.scheduler, dict(pipe.scheduler.config))
    pipe.set_progress_bar_config(disable=True)
    prompts = [cfg.calibration_prompts[i % len(cfg.calibration_prompts)] for i in range(cfg.calibration_samples)]
    with record_unet_calls(pipe.unet) as batches, \
            ctx.progress("recording the teacher's trajectories", len(prompts)) as advance:
        for i, prompt in enumerate(prompts):
            pipe(prompt, num_inference_steps=cfg.calibration_steps, guidance_scale=cfg.guidance_scale,
                 height=meta["resolution"], width=meta["resolution"], output_type="latent",
                 generator=torch.Generator().manual_seed(ctx.seed + CALIBRATION_SEED_OFFSET + i))
            advance(1)
    return list(batches), {"source": "teacher pipeline sampling from prompts", "prompts": prompts,
                           "guidance_scale": cfg.guidance_scale}


def _quantize_modelopt(ctx: StageContext, role: str, batches: list, meta: dict, dst) -> dict:
    from deploykit.quantize.modelopt_int8 import ModeloptInt8Config, export_qdq_onnx, quantize_modelopt, quantizer_states

    cfg = ctx.config
    model = load_model(ctx.inputs[role] / "model")
    names = unet_input_names(model)
    config = ModeloptInt8Config(exclude=tuple(cfg.exclude), alpha=cfg.alpha, conv_calibration=cfg.conv_calibration,
                                percentile=cfg.percentile, per_channel=cfg.per_channel)
    quantized = quantize_modelopt(TensorOutput(unet_of(model)), forward_loop(batches, names), config)
    opset = ctx.read_json("onnx", "export.json").get(role, {}).get("opset", 17)
    export_qdq_onnx(quantized, dst, example_inputs(meta, model, 2, ctx.seed), opset=opset)
    states = quantizer_states(quantized)
    return {"format": "QDQ", "recipe": "modelopt INT8 SmoothQuant (linear) + " f"{cfg.conv_calibration} (conv)",
            "alpha": cfg.alpha, "per_channel": cfg.per_channel, "exclude": list(cfg.exclude), "qdq": qdq_counts(dst),
            "float_layers": sorted(n for n, on in states.items() if not on),
            "calibration_batches": len(batches)}


def run(ctx: StageContext) -> dict:
    cfg = ctx.config
    torch.set_num_threads(cpu_threads())
    meta = teacher_meta(ctx.inputs["teacher"])
    teacher = load_model(ctx.inputs["teacher"] / "model")
    if is_pipeline(meta):
        batches, source = _pipeline_batches(ctx, meta, teacher)
    else:
        batches, source = _pixel_batches(ctx, meta, teacher)
    del teacher
    result = {"backend": cfg.backend, "calibration": {**source, **summarize(batches), "steps": cfg.calibration_steps,
                                                      "scheduler": cfg.scheduler}, "models": {}}
    check = batches[:: max(1, len(batches) // ERROR_BATCHES)][:ERROR_BATCHES]
    for role in (("teacher", "student") if cfg.teacher else ("student",)):
        src = ctx.inputs["onnx"] / role / "unet" / ONNX_NAME
        dst = ctx.out / role / "unet" / ONNX_NAME
        with ctx.progress(f"quantizing the {role} ({cfg.backend})", 1) as advance:
            if cfg.backend == "onnxruntime":
                summary = quantize_onnx(src, dst, batches, OrtInt8Config(
                    per_channel=cfg.per_channel, exclude=tuple(cfg.exclude), calibration=cfg.calibration_method,
                    percentile=cfg.percentile, activations=cfg.activations, reduce_range=cfg.reduce_range))
            else:
                summary = _quantize_modelopt(ctx, role, batches, meta, dst)
            advance(1)
        layers = int8_layers(dst)
        summary["layers"] = {"int8": sum(v["weight"] for v in layers.values()), "float": sum(not v["weight"] for v in layers.values())}
        summary["error_vs_fp32"] = output_error(src, dst, check)
        summary["path"] = f"{role}/unet/{ONNX_NAME}"
        result["models"][role] = summary
        ctx.console.print(f"  {role}: {summary['layers']['int8']} Conv/MatMul/Gemm layers INT8, {summary['layers']['float']} float; "
                          f"output SNR vs fp32 {summary['error_vs_fp32']['snr_db']:.1f} dB "
                          f"({len(batches)} calibration batches)")
    atomic_write_json(ctx.out / "quantize.json", result)
    return {role: v["error_vs_fp32"]["snr_db"] for role, v in result["models"].items()}


# max_quality_loss is checked on the finished build's figures (see deploykit.report.build.quality_gate): changing
# it re-quantizes nothing
QUANTIZE = StageSpec(name="quantize", version="1", reads=("teacher", "student", "onnx"), writes={"onnx_int8": "."},
                     run=run, key_ignores=("max_quality_loss",))
