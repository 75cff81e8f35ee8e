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

import json
import warnings
from collections.abc import Callable
from typing import Literal

import torch
from pydantic import Field, field_validator

from deploykit.bench import measure_group_against, measure_pair
from deploykit.bench.machine import device_info
from deploykit.errors import InputError
from deploykit.io import atomic_write_json
from deploykit.models import count_macs, count_params, load_model
from deploykit.runtime import OnnxRuntimeBackend, TorchBackend, cpu_threads
from deploykit.sparsity import MASKS_FILE
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
from deploykit.stages.bounds import BatchSize, Runs, SamplingSteps, Warmup
from deploykit.stages.data import example_inputs, is_pipeline, load_teacher_pipeline, teacher_meta
from deploykit.stages.footprint import Demand, Footprint
from deploykit.targets import JETSON_TARGETS, ON_DEVICE

ROLES = ("teacher", "student")
Backend = Literal["torch-cpu", "onnxruntime-cpu", "torch-cuda", "onnxruntime-cuda"]
# Backends a bench stage may time on the build machine for a Jetson target (the device is timed remotely)
JETSON_LOCAL_BACKENDS = ("torch-cpu", "onnxruntime-cpu")


class EndToEnd(StrictModel):
    """A whole generation: text encoding, ``steps`` UNet steps with classifier-free guidance, VAE decode."""

    steps: SamplingSteps = 10
    runs: int = Field(3, ge=1, le=1000)
    warmup: int = Field(1, ge=0, le=100)
    prompt: str = Field("a photograph of an astronaut riding a horse", max_length=1000)
    guidance_scale: float = Field(7.5, ge=1.0, le=50.0)


class BenchStage(StageConfig):
    """Latency of teacher and student per backend, interleaved in one run."""

    stage: Literal["bench"] = "bench"
    backends: list[Backend] = Field(default_factory=lambda: ["torch-cpu", "onnxruntime-cpu"], min_length=1)
    batch_size: BatchSize | None = Field(
        None, description="samples per UNet call (default: 2 for SD, classifier-free guidance; 32 otherwise)")
    precision: Literal["fp32", "fp16"] = Field("fp32", description="fp16 needs a CUDA backend")
    compile: bool = Field(False, description="torch backends: time torch.compile'd models (CUDA)")
    semi_structured: bool = Field(True, description="torch-cuda: run a 2:4 student's masked layers on cuSPARSELt "
                                                    "(false: the same zeros through dense kernels)")
    warmup: Warmup = 10
    runs: Runs = 50
    end_to_end: EndToEnd | None = Field(None, description="also time whole generations (SD pipelines)")
    estimate: bool = Field(False, description="put a roofline estimate beside each measurement (deploykit.bench.roofline; "
                                              "CPU peaks measured on the spot, GPU peaks from the data sheet)")

    @field_validator("backends")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError("a backend is listed twice")
        return v


def check(cfg: BenchStage, recipe) -> None:
    if recipe.target in JETSON_TARGETS:  # the device is timed on the device; here only what this CPU runs
        wrong = [b for b in cfg.backends if b not in JETSON_LOCAL_BACKENDS]
        if wrong:
            raise ValueError(f"bench backend {wrong[0]} would time this machine's GPU, not the {recipe.target}'s: "
                             f"{ON_DEVICE.format(target=recipe.target)}; a local bench stage may only use "
                             f"{', '.join(JETSON_LOCAL_BACKENDS)}")
        if cfg.precision != "fp32":
            raise ValueError(f"bench precision {cfg.precision}: the local bench of a Jetson target runs on the CPU in "
                             "fp32; the device's fp16 figures come from `deploykit bench --host`")
        return
    wrong = [b for b in cfg.backends if not b.endswith(recipe.target)]
    if wrong:
        raise ValueError(f"bench backend {wrong[0]} does not run on target {recipe.target}")
    if cfg.precision == "fp16" and recipe.target == "cpu":
        raise ValueError("bench precision fp16 needs target cuda")


def memory(cfg: BenchStage, fp: Footprint) -> list[Demand]:
    batch = cfg.batch_size or (2 if fp.pipeline else 32)
    onnx = any(b.startswith("onnxruntime") for b in cfg.backends)
    return [Demand("bench.batch_size x resolution", fp.unet_call(batch, materialized_attention=onnx),
                   "a timed UNet call" + (", in ONNX Runtime" if onnx else "")),
            Demand("bench.end_to_end x resolution", fp.vae_decode() if cfg.end_to_end else 0, "decoding an image")]


def preflight(cfg: BenchStage, pf: Preflight) -> None:
    if cfg.end_to_end is not None and pf.teacher_kind != "pipeline":
        raise InputError(f"{pf.where}: bench.end_to_end times SD pipelines; teacher {pf.recipe.teacher} is a "
                         "pixel-space UNet")


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


def _device(bench: dict, backend: str) -> str:
    return bench["device"].get("gpu", "cuda") if backend.endswith("cuda") else bench["device"]["cpu"]


def _timed(record: dict, name: str) -> dict | None:
    """A model's latency in one backend's record: the teacher and student, or an INT8 graph timed beside them."""
    timed = record[name] if name in ROLES else record.get("int8", {}).get(name)
    return None if timed is None else {k: v for k, v in timed.items() if not k.startswith("speedup")}


def report_section(ctx: ReportContext) -> dict:
    bench = ctx.read_json("bench.json")
    batch = bench["shape"][0]
    out: dict = {}
    for name in ctx.entries:
        model = "student" if name == "pruned" else name
        entry = {k: bench["models"][model][k] for k in ("params", "macs")} if model in bench["models"] else {}
        if name != "pruned":  # the pruned model has the student's graph; it is timed once, as the student
            entry["latency"] = {b: {**timed, "device": _device(bench, b)} for b, rec in bench["backends"].items()
                                if (timed := _timed(rec, name)) is not None}
        out[name] = entry
    out["speedup"] = {b: v["speedup"] for b, v in bench["backends"].items()}
    out["speedup_pair_median"] = {b: v["speedup_pair_median"] for b, v in bench["backends"].items()}
    out["bench"] = {k: bench[k] for k in ("shape", "precision", "device")}
    out["macs_note"] = f"per UNet call at batch {batch}, {'x'.join(map(str, bench['shape'][1:]))}"
    if "end_to_end" in bench:
        e2e = bench["end_to_end"]
        out["end_to_end"] = {
            **{k: e2e[k] for k in ("steps", "guidance_scale", "prompt")},
            "backends": {b: {"teacher_p50_ms": v["teacher"]["p50_ms"], "student_p50_ms": v["student"]["p50_ms"],
                             "speedup": v["speedup"], "runs": v["teacher"]["runs"]} for b, v in e2e["backends"].items()}}
    if "semi_structured" in bench:
        out["sparsity"] = {"torch_cuda": {k: bench["semi_structured"][k] for k in ("backend", "dtype", "converted", "skipped")}}
    if "estimate" in bench:
        out["estimate"] = bench["estimate"]
    out.update(_int8_speedups(bench))
    return out


def _int8_speedups(bench: dict) -> dict:
    """The INT8 student over the fp32 dense teacher (and the INT8 teacher over it), from the same run."""
    speedup, detail = {}, {}
    for b, rec in bench["backends"].items():
        int8 = rec.get("int8", {})
        if "student-int8" in int8:
            v = int8["student-int8"]
            speedup[b] = v["speedup_vs_teacher"]
            detail[b] = {"student_int8_vs_teacher": v["speedup_vs_teacher"],
                         "student_int8_vs_teacher_pair_median": v["speedup_vs_teacher_pair_median"],
                         "student_int8_vs_student": rec["student"]["p50_ms"] / v["p50_ms"],
                         **({"teacher_int8_vs_teacher": int8["teacher-int8"]["speedup_vs_teacher"]}
                            if "teacher-int8" in int8 else {})}
    return {"speedup_int8": speedup, "int8": {"speedup": detail}} if speedup else {}


def markdown_rows(report: dict) -> Markdown | None:
    rows = Markdown()
    if "bench" in report:
        b = report["bench"]
        where = f"{b['device']['cpu']}, {b['device']['threads']} threads" + (f"; {b['device']['gpu']}" if "gpu" in b["device"] else "")
        rows.caption.append(f"Latency: {b['precision']}, UNet input {'x'.join(map(str, b['shape']))}"
                            + (f" ({report['resolution']}x{report['resolution']} images)" if "resolution" in report else "")
                            + f", {where}; teacher and student interleaved in one run. MACs {report.get('macs_note', '')}.")
        rows.figures.append("![latency](plots/latency.png)")
    if "end_to_end" in report:
        e = report["end_to_end"]
        rows.body += [f"End to end (text encoding, {e['steps']} steps at guidance {e['guidance_scale']}, VAE decode; one image):",
                      "", "| backend | teacher p50 s | student p50 s | speedup |", "|---|---|---|---|"]
        rows.body += [f"| {name} | {v['teacher_p50_ms'] / 1e3:.2f} | {v['student_p50_ms'] / 1e3:.2f} | **{v['speedup']:.2f}x** |"
                      for name, v in e["backends"].items()]
        rows.body.append("")
    if report.get("estimate"):  # (a remote bench adds its device's estimate beside its measurement)
        rows.body += ["Roofline estimate beside measurement (deploykit.bench.roofline; sum over ops of max(FLOPs / peak, "
                      "bytes / bandwidth)):", "",
                      "| backend | model | estimate ms | measured p50 ms | measured / estimate | peaks |", "|---|---|---|---|---|---|"]
        for name, e in report["estimate"].items():
            if "skipped" in e:
                rows.body.append(f"| {name} | – | – | – | – | skipped: {e['skipped']} |")
                continue
            d = e["device"]
            peaks = f"{d['name']}: {max(d['matrix'].values()) / 1e9:.0f} GFLOP/s, {d['bandwidth'] / 1e9:.1f} GB/s"
            rows.body += [f"| {name} | {role} | {e[role]['ms']:.2f} | {e[role]['measured_p50_ms']:.2f} | "
                          f"{e[role]['measured_over_estimate']:.2f}x | {peaks} |" for role in ROLES]
        rows.body.append("")
    return rows


def publish(ctx: PublishContext) -> None:
    from deploykit.report.plots import latency_bars

    latency_bars(ctx.into["plots"] / "latency.png", json.loads((ctx.folder / "bench.json").read_text()))


BENCH = StageSpec(name="bench", version="2", config=BenchStage, reads=("teacher", "student"),
                  optional_reads=("onnx", "onnx_int8"), writes={"bench": "."}, run=run, check=check, preflight=preflight,
                  depends_on=(*MODEL_PACKAGES, *ONNX_PACKAGES, "openvino"), machine=True, memory=memory,
                  report=report_section, markdown=markdown_rows, publish=publish)
