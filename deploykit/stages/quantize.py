"""quantize: INT8 teacher and student UNets from the exported ONNX graphs, calibrated on the teacher's sampling.

Writes ``<role>/unet/model.onnx`` (QDQ INT8; SD UNets over 2 GB get ``model.onnx_data`` beside it) for
the student and, unless ``teacher: false``, the teacher, plus ``quantize.json`` (calibration set, layers
quantized and kept float, the INT8 output's error against the fp32 graph). Only the UNet is quantized:
for Stable Diffusion the artifact's ``onnx_int8/`` is the student's fp32 pipeline folder with this UNet
in place of the fp32 one, loadable by optimum's ``ORTStableDiffusionPipeline``.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, field_validator, model_validator

from deploykit.errors import InputError, QualityGateError
from deploykit.io import atomic_write_json
from deploykit.models import load_model
from deploykit.models.inputs import unet_input_names, unet_of
from deploykit.models.wrappers import TensorOutput
from deploykit.quantize.calibration import RecordingDenoiser, forward_loop, record_unet_calls, summarize
from deploykit.quantize.exclude import DEFAULT_EXCLUDE
from deploykit.quantize.onnx_int8 import OrtInt8Config, int8_layers, output_error, qdq_counts, quantize_onnx
from deploykit.runtime import TorchBackend, cpu_threads, make_pipeline_scheduler, make_scheduler
from deploykit.runtime.sampling import sample
from deploykit.stages.base import (
    MODEL_PACKAGES,
    ONNX_PACKAGES,
    Markdown,
    Preflight,
    PublishContext,
    ReportContext,
    StageConfig,
    StageContext,
    StageSpec,
    StrictModel,
)
from deploykit.stages.bounds import SamplingSteps
from deploykit.stages.data import example_inputs, is_pipeline, load_teacher_pipeline, teacher_meta
from deploykit.stages.footprint import Demand, Footprint

ONNX_NAME = "model.onnx"
CALIBRATION_SEED_OFFSET = 7919  # calibration noise / generators differ from eval's (which uses the build seed)
ERROR_BATCHES = 4  # calibration batches on which the INT8 output is compared with fp32
CALIBRATION_PROMPTS = ("a cat sitting on a windowsill, morning light", "a city street at night in the rain",
                       "a watercolor painting of mountains and a lake", "a close-up photo of a sunflower",
                       "an old wooden boat on a beach", "a plate of pancakes with berries")
# the report's INT8 models, beside the fp32 teacher / pruned / student
INT8_MODELS = ("teacher-int8", "student-int8")


class QualityLoss(StrictModel):
    """The largest quality loss INT8 may cost, each metric in its own "worse" direction, measured by the
    eval stage as INT8 student against fp32 student on the same noise / prompts and seeds."""

    fid: float | None = Field(None, ge=0, le=1000, description="largest FID increase (zoo teachers)")
    psnr_vs_teacher: float | None = Field(None, ge=0, le=100, description="largest drop of PSNR against the teacher, in dB")
    ssim_vs_teacher: float | None = Field(None, ge=0, le=2, description="largest drop of SSIM against the teacher")

    @model_validator(mode="after")
    def _some_metric(self):
        if self.fid is None and self.psnr_vs_teacher is None and self.ssim_vs_teacher is None:
            raise ValueError("name at least one of fid, psnr_vs_teacher, ssim_vs_teacher")
        return self

    def limits(self) -> dict[str, float]:
        return {k: v for k, v in self.model_dump().items() if v is not None}


class QuantizeStage(StageConfig):
    """INT8 post-training quantization of the exported teacher and student UNets, calibrated on the teacher's
    own sampling trajectories (noise for pixel UNets, prompts for Stable Diffusion).

    ``backend: onnxruntime`` (the CPU path): ONNX Runtime static quantization into a QDQ graph, per-channel
    weights. ``backend: modelopt`` (the TensorRT path): modelopt INT8 SmoothQuant for linear layers and
    percentile calibration for convolutions, exported as a QDQ graph TensorRT builds INT8 engines from
    (needs ``pip install 'deploykit[modelopt]'``). Both write ``<role>/unet/model.onnx``; the bench times
    them on onnxruntime-cpu beside the fp32 graphs.
    """

    stage: Literal["quantize"] = "quantize"
    backend: Literal["onnxruntime", "modelopt"] = "onnxruntime"
    teacher: bool = Field(True, description="also quantize the teacher, so INT8 and fp32 are compared for both")
    calibration_samples: int = Field(64, ge=1, le=100_000,
                                     description="teacher trajectories to record: noise samples (pixel UNets) or "
                                                 "prompts (SD, cycled over calibration_prompts)")
    calibration_steps: SamplingSteps = Field(10, description="sampling steps per trajectory; every UNet call is "
                                                             "one calibration batch")
    calibration_prompts: list[str] = Field(default_factory=lambda: list(CALIBRATION_PROMPTS), min_length=1,
                                           description="SD teachers: calibration prompts (kept apart from eval's)")
    scheduler: Literal["ddim", "dpm-solver++", "euler"] = "ddim"
    guidance_scale: float = Field(7.5, ge=1.0, le=50.0)
    exclude: list[str] = Field(default_factory=lambda: list(DEFAULT_EXCLUDE),
                               description="fnmatch globs of UNet module names that stay float (default: "
                                           f"{', '.join(DEFAULT_EXCLUDE)}: NVIDIA's diffusers exclusions)")
    per_channel: bool = Field(True, description="one weight scale per output channel")
    calibration_method: Literal["minmax", "percentile", "entropy"] = Field(
        "minmax", description="onnxruntime: activation ranges from the min / max, a percentile, or entropy")
    activations: Literal["uint8", "int8"] = Field("uint8", description="onnxruntime: activation type (uint8: asymmetric)")
    reduce_range: bool = Field(False, description="onnxruntime: 7-bit weights (x86 CPUs without VNNI can saturate)")
    alpha: float = Field(0.8, ge=0, le=1, description="modelopt: SmoothQuant migration strength")
    conv_calibration: Literal["percentile", "max"] = Field("percentile", description="modelopt: convolution input ranges")
    percentile: float = Field(99.99, gt=50, le=100, description="percentile of |x| for percentile calibration")
    max_quality_loss: QualityLoss | None = Field(
        None, description="fail the build (exit code 3) when the INT8 student loses more than this against the fp32 "
                          "student; needs an eval stage")

    @field_validator("exclude")
    @classmethod
    def _patterns(cls, v: list[str]) -> list[str]:
        if any(not p.strip() for p in v):
            raise ValueError("exclude patterns must be non-empty")
        return v


def check(cfg: QuantizeStage, recipe) -> None:
    if cfg.max_quality_loss is not None and recipe.stage("eval") is None:
        raise ValueError("quantize.max_quality_loss is checked on the eval stage's figures: add an eval stage")


def preflight(cfg: QuantizeStage, pf: Preflight) -> None:
    if cfg.backend == "modelopt":
        from deploykit.quantize.modelopt_int8 import INSTALL_HINT, modelopt_available

        if not modelopt_available():
            raise InputError(f"{pf.where}: quantize.backend modelopt needs nvidia-modelopt, which is not installed: "
                             f"{INSTALL_HINT}; or use backend onnxruntime")
    if pf.teacher_kind == "pipeline" and cfg.max_quality_loss is not None and cfg.max_quality_loss.fid is not None:
        raise InputError(f"{pf.where}: quantize.max_quality_loss.fid: FID is not measured for Stable Diffusion pipelines; "
                         "use psnr_vs_teacher / ssim_vs_teacher")


def memory(cfg: QuantizeStage, fp: Footprint) -> list[Demand]:
    # every UNet call of the teacher's trajectories is kept as a calibration batch: one call per step over all the
    # samples for pixel UNets; one per step and prompt, two rows (classifier-free guidance), for pipelines
    rows = 2 if fp.pipeline else 1
    return [Demand("quantize.calibration_samples x quantize.calibration_steps x resolution",
                   cfg.calibration_samples * cfg.calibration_steps * rows * (fp.sample_bytes + fp.cond_bytes),
                   "the recorded calibration batches"),
            Demand("quantize.calibration_samples x resolution",
                   fp.unet_call(rows if fp.pipeline else cfg.calibration_samples, materialized_attention=True),
                   "a UNet call on one calibration batch, in ONNX Runtime")]


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


def report_section(ctx: ReportContext) -> dict:
    """The INT8 models' entries and how they were quantized; the bench and eval stages add what they measured."""
    quantize = ctx.read_json("quantize.json")
    out: dict = {f"{role}-int8": {"error_vs_fp32": q["error_vs_fp32"]} for role, q in quantize["models"].items()}
    out["int8"] = {"backend": quantize["backend"], "calibration": quantize["calibration"],
                   "models": {role: {k: v for k, v in q.items() if k in ("format", "per_channel", "calibration", "activations",
                                                                          "layers", "qdq", "error_vs_fp32", "exclude", "recipe")}
                              for role, q in quantize["models"].items()}}
    return out


def conclude(cfg: QuantizeStage, report: dict) -> dict:
    """Each INT8 model's size (its fp32 model's) and the quality gate's verdict on the eval stage's figures."""
    out: dict = {}
    for name in (n for n in INT8_MODELS if n in report):
        fp32 = report.get(name.removesuffix("-int8"), {})
        out[name] = {k: fp32[k] for k in ("params", "macs") if k in fp32}
    limits = cfg.max_quality_loss.limits() if cfg.max_quality_loss else {}
    if limits:
        out["int8"] = {"max_quality_loss": limits,
                       "gate": _verdict(limits, report["int8"].get("quality_loss"), report.get("eval"))}
    return out


def _verdict(limits: dict, loss: dict | None, evaluation: dict | None) -> dict:
    if evaluation is None:
        return {"status": "not checked", "reason": "no eval stage"}
    if evaluation.get("skipped"):
        return {"status": "not checked", "reason": evaluation["skipped"]}
    loss = loss or {}
    missing = [m for m in limits if m not in loss]
    if missing:
        return {"status": "failed", "reason": f"{', '.join(missing)} not measured for the INT8 student "
                                              "(FID needs a teacher with a known data set)"}
    over = {m: loss[m] for m, limit in limits.items() if loss[m] > limit}
    if over:
        worst = ", ".join(f"{m} lost {loss[m]:.3g} (at most {limits[m]:g} accepted)" for m in over)
        return {"status": "failed", "reason": f"INT8 student vs fp32 student: {worst}"}
    return {"status": "passed", "reason": ", ".join(f"{m} lost {loss[m]:.3g} <= {limits[m]:g}" for m in limits)}


def gate(cfg: QuantizeStage, report: dict) -> str | None:
    """Raise :class:`QualityGateError` when ``max_quality_loss`` is exceeded; otherwise how the gate went."""
    verdict = report.get("int8", {}).get("gate")
    if verdict is None:
        return None
    if verdict["status"] == "failed":
        raise QualityGateError(f"{verdict['reason']} (quantize.max_quality_loss in recipe {report['recipe']}); "
                               "nothing was written: relax the limit, exclude more layers, or change the calibration")
    return f"INT8 quality gate {verdict['status']}: {verdict['reason']}"


def markdown_rows(report: dict) -> Markdown | None:
    if "int8" not in report:
        return None
    q = report["int8"]
    cal = q["calibration"]
    lines = []
    for b, v in q.get("speedup", {}).items():
        lines.append(f"INT8 ({b}, same run as the fp32 models): student-int8 **{v['student_int8_vs_teacher']:.2f}x** over the "
                     f"fp32 dense teacher (median of per-round ratios {v['student_int8_vs_teacher_pair_median']:.2f}x), "
                     f"{v['student_int8_vs_student']:.2f}x over the fp32 student"
                     + (f"; teacher-int8 {v['teacher_int8_vs_teacher']:.2f}x over the fp32 teacher"
                        if "teacher_int8_vs_teacher" in v else "")
                     + ".")
    model = q["models"].get("student", {})
    layers = model.get("layers", {})
    lines.append(f"Quantized with `{q['backend']}` (QDQ, {'per-channel' if model.get('per_channel', True) else 'per-tensor'} weights; "
                 f"student: {layers.get('int8', '?')} layers INT8, {layers.get('float', '?')} float, output SNR vs fp32 "
                 f"{model.get('error_vs_fp32', {}).get('snr_db', float('nan')):.1f} dB), calibrated on {cal['batches']} UNet calls "
                 f"of the teacher's own sampling ({cal['source']}, {cal['steps']} {cal['scheduler']} steps).")
    if q.get("quality_loss"):
        lines.append("Quality lost to INT8 (student-int8 against the fp32 student; positive is worse): "
                     + ", ".join(f"{m} {v:+.3f}" for m, v in q["quality_loss"].items()) + ".")
    if "gate" in q:
        limits = ", ".join(f"{m} {v:g}" for m, v in q["max_quality_loss"].items())
        lines.append(f"Quality gate (largest loss accepted: {limits}): **{q['gate']['status']}** ({q['gate']['reason']}).")
    return Markdown(body=lines)


def publish(ctx: PublishContext) -> None:
    """The INT8 student in the layout of ``onnx/``: for SD the student's fp32 pipeline with the INT8 UNet in place."""
    int8, dest = ctx.folder / "student" / "unet", ctx.into["onnx_int8"]
    if not int8.is_dir():
        return
    pipeline = ctx.roles["onnx"] / "student"
    if any(p.name != "unet" for p in pipeline.iterdir()):
        shutil.copytree(pipeline, dest, dirs_exist_ok=True, ignore=lambda d, names: names if Path(d).name == "unet" else [])
    shutil.copytree(int8, dest / "unet", dirs_exist_ok=True)
    config = pipeline / "unet" / "config.json"
    if config.is_file():
        shutil.copyfile(config, dest / "unet" / "config.json")


# max_quality_loss is checked on the finished build's figures (``gate``): changing it re-quantizes nothing
QUANTIZE = StageSpec(name="quantize", version="1", config=QuantizeStage, reads=("teacher", "student", "onnx"),
                     writes={"onnx_int8": "."}, run=run, key_ignores=("max_quality_loss",), models=INT8_MODELS,
                     depends_on=(*MODEL_PACKAGES, *ONNX_PACKAGES, "nvidia-modelopt"), memory=memory, check=check,
                     preflight=preflight, report=report_section, conclude=conclude, gate=gate,
                     markdown=markdown_rows, publish=publish)
