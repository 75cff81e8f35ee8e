"""bench: teacher and student latency per backend, interleaved in one run on the same inputs.

Per UNet call at the recipe's batch (SD: batch 2, the two halves of classifier-free guidance), and
for SD pipelines optionally end to end: text encoding, N steps, VAE decode. On torch-cuda a 2:4
student runs its masked layers on cuSPARSELt (``semi_structured``); CPU backends have no 2:4
kernels and run the same zeros densely.

When a quantize stage ran, ``onnxruntime-cpu`` times the INT8 graphs (``teacher-int8``,
``student-int8``) round-robin with the fp32 teacher and student in the same window; their speedups are
taken against the fp32 dense teacher.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch

from deploykit.bench import measure_group_against, measure_pair
from deploykit.bench.machine import device_info
from deploykit.errors import InputError
from deploykit.io import atomic_write_json
from deploykit.models import count_macs, count_params, load_model
from deploykit.runtime import OnnxRuntimeBackend, TorchBackend, cpu_threads
from deploykit.sparsity import MASKS_FILE
from deploykit.stages.base import StageContext, StageSpec
from deploykit.stages.data import example_inputs, is_pipeline, load_teacher_pipeline, teacher_meta

ROLES = ("teacher", "student")


def _onnx_dir(ctx: StageContext, role: str, fp16: bool):
    if "onnx" not in ctx.inputs:
        raise InputError("bench: onnxruntime backends need an export stage before bench")
    folder = ctx.inputs["onnx"] / (f"{role}-fp16" if fp16 else role)
    if not folder.is_dir():
        raise InputError(f"bench: no {'fp16 ' if fp16 else ''}ONNX export of the {role} (set export.fp16: true)")
    return folder


def _check_device(name: str) -> None:
    if name.endswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"bench backend {name}: no CUDA device on this machine")
    if name == "onnxruntime-cuda":
        import onnxruntime as ort

        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise InputError("bench backend onnxruntime-cuda: this onnxruntime has no CUDAExecutionProvider "
                             "(install onnxruntime-gpu)")


def _semi_structured_student(ctx: StageContext, model: torch.nn.Module, dtype: torch.dtype) -> tuple[torch.nn.Module, dict]:
    """The 2:4 student with its masked layers on cuSPARSELt (a copy: the torch-cpu and ONNX runs keep the dense one)."""
    import copy

    from deploykit.sparsity import load_masks, to_semi_structured

    masks = load_masks(ctx.inputs["student"] / "model" / MASKS_FILE)
    sparse = copy.deepcopy(model)
    plan = to_semi_structured(sparse, dtype, names=list(masks))
    ctx.console.print(f"  torch-cuda: {len(plan.convert)} of {len(masks)} 2:4 layers on cuSPARSELt ({plan.dtype})")
    return sparse, plan.as_dict()


def _step_backends(name: str, ctx: StageContext, models: dict, fp16: bool, result: dict) -> list:
    cfg = ctx.config
    if name.startswith("torch-"):
        device = "cuda" if name == "torch-cuda" else "cpu"
        dtype = torch.float16 if fp16 else torch.float32
        student = models["student"]
        if name == "torch-cuda" and cfg.semi_structured and (ctx.inputs["student"] / "model" / MASKS_FILE).is_file():
            student, result["semi_structured"] = _semi_structured_student(ctx, student, dtype)
        return [TorchBackend(models["teacher"], device, dtype, compile=cfg.compile),
                TorchBackend(student, device, dtype, compile=cfg.compile)]
    providers = ["CUDAExecutionProvider"] if name == "onnxruntime-cuda" else ["CPUExecutionProvider"]
    return [OnnxRuntimeBackend(_onnx_dir(ctx, r, fp16) / "unet" / "model.onnx", providers) for r in ROLES]


def _end_to_end_callables(name: str, ctx: StageContext, models: dict, meta: dict, fp16: bool) -> list[Callable]:
    e2e, side = ctx.config.end_to_end, meta["resolution"]
    kwargs = {"num_inference_steps": e2e.steps, "guidance_scale": e2e.guidance_scale, "height": side, "width": side,
              "output_type": "np"}
    if name.startswith("torch-"):
        device = "cuda" if name == "torch-cuda" else "cpu"
        pipes = [load_teacher_pipeline(ctx.inputs["teacher"], models[r]).to(device, torch.float16 if fp16 else torch.float32)
                 for r in ROLES]
    else:
        from optimum.onnxruntime import ORTDiffusionPipeline

        provider = "CUDAExecutionProvider" if name == "onnxruntime-cuda" else "CPUExecutionProvider"
        pipes = [ORTDiffusionPipeline.from_pretrained(_onnx_dir(ctx, r, fp16), provider=provider) for r in ROLES]
    for p in pipes:
        p.set_progress_bar_config(disable=True)

    def generate(pipe) -> Callable:
        def call():
            with warnings.catch_warnings():  # optimum's ORT wrappers trip diffusers' deprecation notices
                warnings.simplefilter("ignore", FutureWarning)
                out = pipe(e2e.prompt, generator=torch.Generator().manual_seed(ctx.seed), **kwargs).images
            if name == "torch-cuda":
                torch.cuda.synchronize()
            return out
        return call

    return [generate(p) for p in pipes]


def _int8_graphs(ctx: StageContext) -> dict[str, object]:
    if "onnx_int8" not in ctx.inputs:
        return {}
    paths = {f"{r}-int8": ctx.inputs["onnx_int8"] / r / "unet" / "model.onnx" for r in ROLES}
    return {name: p for name, p in paths.items() if p.is_file()}


def _group_record(ctx: StageContext, name: str, teacher, student, int8: dict, inputs) -> dict:
    """fp32 teacher and student and the INT8 graphs, round-robin in one window."""
    cfg = ctx.config
    calls = {"teacher": lambda: teacher(*inputs), "student": lambda: student(*inputs)}
    backends = {k: OnnxRuntimeBackend(p) for k, p in int8.items()}
    calls.update({k: (lambda b=b: b(*inputs)) for k, b in backends.items()})
    with ctx.progress(f"{name} teacher vs student, fp32 and INT8", cfg.runs) as advance:
        latency, ratios = measure_group_against(calls, "teacher", cfg.warmup, cfg.runs, advance)
    t = latency["teacher"].p50_ms
    return {"teacher": latency["teacher"].__dict__, "student": latency["student"].__dict__,
            "speedup": t / latency["student"].p50_ms, "speedup_pair_median": ratios["student"],
            "int8": {k: {**latency[k].__dict__, "speedup_vs_teacher": t / latency[k].p50_ms,
                         "speedup_vs_teacher_pair_median": ratios[k]} for k in backends}}


def _pair_record(pair) -> dict:
    return {"teacher": pair.teacher.__dict__, "student": pair.student.__dict__,
            "speedup": pair.speedup, "speedup_pair_median": pair.speedup_pair_median}


def roofline_estimates(backends: dict, models: dict, inputs, precision: str, gpu: str | None) -> dict:
    """Roofline estimate per backend beside its measurement (``bench.estimate``; deploykit.bench.roofline).

    CPU backends: this CPU's peaks measured now (sgemm, memcpy), no per-op floor. CUDA backends: the
    GPU's data-sheet peaks where the table has it, else skipped with the reason.
    """
    from deploykit.bench.roofline import device_for_gpu, device_record, estimate, measure_cpu, op_costs

    costs = {role: op_costs(m, inputs) for role, m in models.items()}
    devices: dict = {}
    out: dict = {}
    for name, measured in backends.items():
        if name.endswith("cpu"):
            device = devices.setdefault("cpu", measure_cpu(seconds=0.5))
            launch, prec, scale = 0.0, "fp32", 1.0
        else:
            device = device_for_gpu(gpu or "")
            if device is None:
                out[name] = {"skipped": f"no peaks on record for GPU {gpu!r} (deploykit.bench.roofline.DEVICES)"}
                continue
            launch, prec, scale = None, precision, 0.5 if precision == "fp16" else 1.0
        entry: dict = {"device": device_record(device)}
        for role in ROLES:
            est = estimate(costs[role], device, prec, launch_s=launch, bytes_scale=scale)
            entry[role] = {**est, "measured_p50_ms": measured[role]["p50_ms"],
                           "measured_over_estimate": measured[role]["p50_ms"] / est["ms"]}
        out[name] = entry
    return out


def run(ctx: StageContext) -> dict:
    cfg = ctx.config
    meta = teacher_meta(ctx.inputs["teacher"])
    pipeline = is_pipeline(meta)
    for name in cfg.backends:
        _check_device(name)
    fp16 = cfg.precision == "fp16"
    torch.set_num_threads(cpu_threads())
    batch = cfg.batch_size or (2 if pipeline else 32)
    models = {role: load_model(ctx.inputs[role] / "model") for role in ROLES}
    inputs = example_inputs(meta, models["teacher"], batch, ctx.seed)
    result = {
        "shape": [batch, *meta["sample_shape"]],
        "precision": cfg.precision,
        "device": device_info(cuda=any(b.endswith("cuda") for b in cfg.backends)),
        "models": {role: {"params": count_params(m), "macs": count_macs(m, inputs)} for role, m in models.items()},
        "backends": {},
    }
    if pipeline:
        result["resolution"] = meta["resolution"]
    int8 = _int8_graphs(ctx)
    for name in cfg.backends:
        teacher, student = _step_backends(name, ctx, models, fp16, result)
        if name == "onnxruntime-cpu" and int8:
            record = _group_record(ctx, name, teacher, student, int8, inputs)
        else:
            with ctx.progress(f"{name} teacher vs student", cfg.runs) as advance:
                pair = measure_pair(lambda: teacher(*inputs), lambda: student(*inputs), cfg.warmup, cfg.runs, advance)
            record = _pair_record(pair)
        del teacher, student
        result["backends"][name] = record
        ctx.console.print(f"  {name}: teacher p50 {record['teacher']['p50_ms']:.1f} ms, student p50 "
                          f"{record['student']['p50_ms']:.1f} ms -> {record['speedup']:.2f}x (UNet call, batch {batch}, "
                          f"{cfg.precision})")
        for k, v in record.get("int8", {}).items():
            ctx.console.print(f"  {name}: {k} p50 {v['p50_ms']:.1f} ms -> {v['speedup_vs_teacher']:.2f}x over the fp32 teacher")
    if cfg.estimate:
        result["estimate"] = roofline_estimates(result["backends"], models, inputs, cfg.precision,
                                                result["device"].get("gpu"))
    if cfg.end_to_end is not None:
        e2e = cfg.end_to_end
        result["end_to_end"] = {"steps": e2e.steps, "guidance_scale": e2e.guidance_scale, "prompt": e2e.prompt,
                                "images": 1, "backends": {}}
        for name in cfg.backends:
            teacher, student = _end_to_end_callables(name, ctx, models, meta, fp16)
            with ctx.progress(f"{name} end to end", e2e.runs) as advance:
                pair = measure_pair(teacher, student, e2e.warmup, e2e.runs, advance)
            del teacher, student
            result["end_to_end"]["backends"][name] = _pair_record(pair)
            ctx.console.print(f"  {name} end to end ({e2e.steps} steps): teacher {pair.teacher.p50_ms / 1e3:.2f} s, "
                              f"student {pair.student.p50_ms / 1e3:.2f} s -> {pair.speedup:.2f}x")
    atomic_write_json(ctx.out / "bench.json", result)
    return {name: v["speedup"] for name, v in result["backends"].items()}


BENCH = StageSpec(name="bench", version="2", reads=("teacher", "student"), optional_reads=("onnx", "onnx_int8"),
                  writes={"bench": "."}, run=run)
