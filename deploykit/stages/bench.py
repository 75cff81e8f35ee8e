"""bench: teacher and student latency per backend, interleaved in one run on the same inputs."""

from __future__ import annotations

import platform

import torch

from deploykit.bench import measure_pair
from deploykit.errors import InputError
from deploykit.io import atomic_write_json
from deploykit.models import count_macs, count_params, load_model
from deploykit.runtime import OnnxRuntimeBackend, TorchBackend, cpu_threads
from deploykit.stages.base import StageContext, StageSpec
from deploykit.stages.data import example_inputs, teacher_meta


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _backend_pair(name: str, ctx: StageContext, models: dict):
    if name == "torch-cpu":
        return TorchBackend(models["teacher"]), TorchBackend(models["student"])
    if name == "onnxruntime-cpu":
        if "onnx" not in ctx.inputs:
            raise InputError("bench backend onnxruntime-cpu needs an export stage before bench")
        return tuple(OnnxRuntimeBackend(ctx.inputs["onnx"] / role / "unet" / "model.onnx") for role in ("teacher", "student"))
    raise InputError(f"backend {name} is not available on this machine")


def run(ctx: StageContext) -> dict:
    cfg = ctx.config
    meta = teacher_meta(ctx.inputs["teacher"])
    torch.set_num_threads(cpu_threads())
    models = {role: load_model(ctx.inputs[role] / "model") for role in ("teacher", "student")}
    x, t = example_inputs(meta, cfg.batch_size, ctx.seed)
    shape = [cfg.batch_size, *meta["sample_shape"]]
    result = {
        "shape": shape,
        "precision": "fp32",
        "device": {"cpu": cpu_name(), "threads": cpu_threads(), "torch": torch.__version__},
        "models": {role: {"params": count_params(m), "macs": count_macs(m, (x, t))} for role, m in models.items()},
        "backends": {},
    }
    for name in cfg.backends:
        teacher, student = _backend_pair(name, ctx, models)
        with ctx.progress(f"{name} teacher vs student", cfg.runs) as advance:
            pair = measure_pair(lambda: teacher(x, t), lambda: student(x, t), cfg.warmup, cfg.runs, advance)
        result["backends"][name] = {
            "teacher": pair.teacher.__dict__, "student": pair.student.__dict__,
            "speedup": pair.speedup, "speedup_pair_median": pair.speedup_pair_median,
        }
        ctx.console.print(f"  {name}: teacher p50 {pair.teacher.p50_ms:.1f} ms, student p50 {pair.student.p50_ms:.1f} ms "
                          f"-> {pair.speedup:.2f}x (batch {cfg.batch_size}, fp32)")
    atomic_write_json(ctx.out / "bench.json", result)
    return {name: v["speedup"] for name, v in result["backends"].items()}


BENCH = StageSpec(name="bench", version="1", reads=("teacher", "student"), optional_reads=("onnx",),
                  writes={"bench": "."}, run=run)
