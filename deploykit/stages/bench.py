"""bench: teacher and student latency on every backend, round-robin in one window on the same inputs.

Per UNet call at the recipe's batch (SD: batch 2, the two halves of classifier-free guidance), and
for SD pipelines optionally end to end, component by component: text encoding, N UNet steps with
guidance, VAE decode, each timed through :mod:`deploykit.runtime`'s SD model (the code every backend
serves with). On torch-cuda a 2:4 student runs its masked layers on cuSPARSELt
(``semi_structured``); CPU backends have no 2:4 kernels and run the same zeros densely.

Every backend's models are timed in the same window, so that ratios across backends are as honest
as those within one. When a quantize stage ran, the ONNX backends (``onnxruntime-cpu``,
``openvino-cpu``) also time the INT8 graphs (``teacher-int8``, ``student-int8``); their speedups are
taken against the fp32 dense teacher on the same backend. ``peers`` sets the fastest student
configuration against the dense teacher in torch eager and the fastest dense configuration
(:mod:`deploykit.bench.peers`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Literal

import torch
from pydantic import Field, field_validator

from deploykit.bench import Latency, Rounds, measure_rounds
from deploykit.bench.machine import device_info
from deploykit.bench.peers import Config, peers
from deploykit.errors import InputError
from deploykit.io import atomic_write_json
from deploykit.models import count_params, load_model
from deploykit.models.ops import measure_macs
from deploykit.runtime import TorchBackend, cpu_threads
from deploykit.runtime.backends import ONNX_BACKENDS, onnx_backend
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
from deploykit.stages.data import example_inputs, is_pipeline, teacher_meta
from deploykit.stages.footprint import Demand, Footprint
from deploykit.targets import JETSON_TARGETS, ON_DEVICE

ROLES = ("teacher", "student")
Backend = Literal["torch-cpu", "onnxruntime-cpu", "openvino-cpu", "torch-cuda", "onnxruntime-cuda"]
# Backends a bench stage may time on the build machine for a Jetson target (the device is timed remotely)
JETSON_LOCAL_BACKENDS = ("torch-cpu", "onnxruntime-cpu", "openvino-cpu")


class EndToEnd(StrictModel):
    """A whole generation: text encoding, ``steps`` UNet steps with classifier-free guidance, VAE decode."""

    steps: SamplingSteps = 10
    runs: int = Field(3, ge=1, le=1000)
    warmup: int = Field(1, ge=0, le=100)
    prompt: str = Field("a photograph of an astronaut riding a horse", max_length=1000)
    guidance_scale: float = Field(7.5, ge=1.0, le=50.0)
    scheduler: Literal["ddim", "dpm-solver++", "euler"] = "ddim"


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
    end_to_end: EndToEnd | None = Field(None, description="also time whole generations (SD pipelines), component by component")
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
    onnx = any(b.startswith(("onnxruntime", "openvino")) for b in cfg.backends)
    return [Demand("bench.batch_size x resolution", fp.unet_call(batch, materialized_attention=onnx),
                   "a timed UNet call" + (", in an ONNX runtime" if onnx else "")),
            Demand("bench.end_to_end x resolution", fp.vae_decode() if cfg.end_to_end else 0, "decoding an image")]


def preflight(cfg: BenchStage, pf: Preflight) -> None:
    if "openvino-cpu" in cfg.backends:  # an optional extra: said before anything is built
        try:
            _check_device("openvino-cpu")
        except InputError as e:
            raise InputError(f"{pf.where}: {e}") from None
    if cfg.end_to_end is not None and pf.teacher_kind != "pipeline":
        raise InputError(f"{pf.where}: bench.end_to_end times SD pipelines; teacher {pf.recipe.teacher} is a "
                         "pixel-space UNet")


def _onnx_dir(ctx: StageContext, role: str, fp16: bool):
    if "onnx" not in ctx.inputs:
        raise InputError("bench: ONNX backends need an export stage before bench")
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
    if name == "openvino-cpu":
        from deploykit.runtime.openvino import openvino_missing

        missing = openvino_missing()
        if missing:
            raise InputError(f"bench backend openvino-cpu: {missing}")


def _semi_structured_student(ctx: StageContext, model: torch.nn.Module, dtype: torch.dtype) -> tuple[torch.nn.Module, dict]:
    """The 2:4 student with its masked layers on cuSPARSELt (a copy: the torch-cpu and ONNX runs keep the dense one)."""
    import copy

    from deploykit.sparsity import load_masks, to_semi_structured

    masks = load_masks(ctx.inputs["student"] / "model" / MASKS_FILE)
    sparse = copy.deepcopy(model)
    plan = to_semi_structured(sparse, dtype, names=list(masks))
    ctx.console.print(f"  torch-cuda: {len(plan.convert)} of {len(masks)} 2:4 layers on cuSPARSELt ({plan.dtype})")
    return sparse, plan.as_dict()


def _int8_folders(ctx: StageContext) -> dict[str, object]:
    """``teacher-int8`` / ``student-int8`` -> the quantize stage's folder for that role (SD: a whole pipeline)."""
    if "onnx_int8" not in ctx.inputs:
        return {}
    folders = {f"{r}-int8": ctx.inputs["onnx_int8"] / r for r in ROLES}
    return {name: f for name, f in folders.items() if (f / "unet" / "model.onnx").is_file()}


def _configs(name: str, precision: str, int8: dict) -> list[Config]:
    models = list(ROLES) + (list(int8) if name in ONNX_BACKENDS else [])
    return [Config(name, m, "int8" if m.endswith("-int8") else precision) for m in models]


def _step_backends(name: str, ctx: StageContext, models: dict, fp16: bool, int8: dict, result: dict) -> dict:
    """Model name -> a UNet call on backend ``name``: teacher and student, and on ONNX backends the INT8 graphs."""
    cfg = ctx.config
    if name.startswith("torch-"):
        device = "cuda" if name == "torch-cuda" else "cpu"
        dtype = torch.float16 if fp16 else torch.float32
        student = models["student"]
        if name == "torch-cuda" and cfg.semi_structured and (ctx.inputs["student"] / "model" / MASKS_FILE).is_file():
            student, result["semi_structured"] = _semi_structured_student(ctx, student, dtype)
        return {"teacher": TorchBackend(models["teacher"], device, dtype, compile=cfg.compile),
                "student": TorchBackend(student, device, dtype, compile=cfg.compile)}
    graphs = {r: _onnx_dir(ctx, r, fp16) for r in ROLES} | int8
    return {m: onnx_backend(name, folder / "unet" / "model.onnx") for m, folder in graphs.items()}


def _backend_record(rounds: Rounds, configs: list[Config]) -> dict:
    """One backend's figures from the shared window: teacher, student, speedup, and its INT8 graphs."""
    key = {c.model: c.key for c in configs}
    t = rounds.latency(key["teacher"])
    s = rounds.latency(key["student"])
    record = {"teacher": t.__dict__, "student": s.__dict__, "speedup": t.p50_ms / s.p50_ms,
              "speedup_pair_median": rounds.ratio_median(key["teacher"], key["student"])}
    int8 = {m: rounds.latency(k) for m, k in key.items() if m.endswith("-int8")}
    if int8:
        record["int8"] = {m: {**lat.__dict__, "speedup_vs_teacher": t.p50_ms / lat.p50_ms,
                              "speedup_vs_teacher_pair_median": rounds.ratio_median(key["teacher"], key[m])}
                          for m, lat in int8.items()}
    return record


def _eager(cfg: BenchStage, configs: list[Config]) -> Config | None:
    """The dense teacher in torch eager, where it was timed (not under ``compile``)."""
    if cfg.compile:
        return None
    return next((c for c in configs if c.backend.startswith("torch-") and c.model == "teacher"), None)


class _Timed:
    """A component call that adds up the seconds it took (reset per generation)."""

    def __init__(self, fn: Callable):
        self.fn, self.seconds = fn, 0.0

    def __call__(self, *args):
        started = time.perf_counter()
        out = self.fn(*args)
        self.seconds += time.perf_counter() - started
        return out


COMPONENTS = ("text_encoder", "unet", "vae_decoder")


def _sd_models(name: str, ctx: StageContext, models: dict, meta: dict, fp16: bool, int8: dict) -> dict:
    """Model name -> the runtime's SD model on backend ``name``: the student's own components (its ONNX
    pipeline folder; for torch, the teacher's text encoder and VAE unless :func:`_student_vae` gives one)."""
    from deploykit.runtime.models import SDModel, onnx_sd_components, torch_call, torch_sd_components

    unet_config = dict(models["teacher"].config)
    if name.startswith("torch-"):
        from diffusers import AutoencoderKL
        from transformers import CLIPTextModel

        device = "cuda" if name == "torch-cuda" else "cpu"
        dtype = torch.float16 if fp16 else torch.float32
        pipeline = ctx.inputs["teacher"] / "pipeline"
        # one text encoder and VAE for both: they are the same weights
        text = CLIPTextModel.from_pretrained(pipeline / "text_encoder", use_safetensors=True)
        vae = AutoencoderKL.from_pretrained(pipeline / "vae", use_safetensors=True)
        components = {r: torch_sd_components(pipeline, torch_call(models[r], device, dtype), device, text_encoder=text,
                                             vae=(_student_vae(ctx) or vae) if r == "student" else vae) for r in ROLES}
    else:
        folders = {r: _onnx_dir(ctx, r, fp16) for r in ROLES}
        # an INT8 model is its role's fp32 pipeline with the INT8 UNet
        unets = {r: folders[r] for r in ROLES} | int8
        components = {m: onnx_sd_components(folders[m.removesuffix("-int8")], lambda c, m=m: onnx_backend(
            name, (unets[m] if c == "unet" else folders[m.removesuffix("-int8")]) / c / "model.onnx")) for m in unets}
    return {m: SDModel(c, unet_config, meta["scheduler_config"], meta["resolution"]) for m, c in components.items()}


def _student_vae(ctx: StageContext):
    """The student's own VAE decoder for the torch path, where a stage shrank it; None: the teacher's.

    The hook a VAE-decoder stage plugs into (a ``student.vae_decoder`` role with a diffusers VAE); until one
    is wired, torch runs the teacher's decoder and the ONNX backends whatever the student's folder holds."""
    return None


def _generation(model, e2e: EndToEnd, seed: int, log: list) -> Callable[[], object]:
    """One image from ``model``, each component's seconds appended to ``log``."""
    timed = {c: _Timed(getattr(model, c)) for c in COMPONENTS}
    for c, t in timed.items():
        setattr(model, c, t)
    noise = torch.randn(1, *model.latent_shape(model.size, model.size), generator=torch.Generator().manual_seed(seed))

    def call():
        for t in timed.values():
            t.seconds = 0.0
        out = model.generate(noise, e2e.scheduler, e2e.steps, prompts=[e2e.prompt], negative_prompts=[""],
                             guidance_scale=e2e.guidance_scale)
        log.append({c: t.seconds for c, t in timed.items()})
        return out
    return call


def _end_to_end(ctx: StageContext, models: dict, meta: dict, fp16: bool, int8: dict) -> dict:
    """Whole generations, every backend's models round-robin in one window, timed component by component."""
    cfg, e2e = ctx.config, ctx.config.end_to_end
    calls, logs, configs = {}, {}, {}
    for name in cfg.backends:
        for model_name, model in _sd_models(name, ctx, models, meta, fp16, int8 if name in ONNX_BACKENDS else {}).items():
            key = f"{name} {model_name}"
            logs[key] = []
            calls[key] = _generation(model, e2e, ctx.seed, logs[key])
            configs.setdefault(name, []).append(model_name)
    with ctx.progress("end to end, every backend in one window", e2e.runs) as advance:
        rounds = measure_rounds(calls, e2e.warmup, e2e.runs, advance)
    result = {"steps": e2e.steps, "guidance_scale": e2e.guidance_scale, "prompt": e2e.prompt,
              "scheduler": e2e.scheduler, "images": 1, "backends": {}}
    for name, model_names in configs.items():
        record = _backend_record(rounds, [Config(name, m, "") for m in model_names])
        for m in model_names:
            parts = {c: Latency.from_seconds([entry[c] for entry in logs[f"{name} {m}"][-e2e.runs:]]).__dict__
                     for c in COMPONENTS}
            parts["unet_per_step"] = {k: (v / e2e.steps if k.endswith("_ms") else v) for k, v in parts["unet"].items()}
            (record[m] if m in ROLES else record["int8"][m])["components"] = parts
        t, s = record["teacher"]["components"], record["student"]["components"]
        record["speedup_by_component"] = {c: t[c]["p50_ms"] / s[c]["p50_ms"] for c in COMPONENTS}
        result["backends"][name] = record
        ctx.console.print(f"  {name} end to end ({e2e.steps} steps): teacher {record['teacher']['p50_ms'] / 1e3:.2f} s, "
                          f"student {record['student']['p50_ms'] / 1e3:.2f} s -> {record['speedup']:.2f}x")
    return result


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
        "models": {role: _size(m, inputs) for role, m in models.items()},
        "window": "every backend's models round-robin in one window",
        "backends": {},
    }
    if pipeline:
        result["resolution"] = meta["resolution"]
    int8 = _int8_folders(ctx)
    configs = {name: _configs(name, cfg.precision, int8) for name in cfg.backends}
    calls = {}
    for name in cfg.backends:
        for model_name, backend in _step_backends(name, ctx, models, fp16, int8 if name in ONNX_BACKENDS else {},
                                                  result).items():
            calls[f"{name} {model_name}"] = lambda b=backend: b(*inputs)
    with ctx.progress(f"{len(calls)} models on {len(cfg.backends)} backend(s), one window", cfg.runs) as advance:
        rounds = measure_rounds(calls, cfg.warmup, cfg.runs, advance)
    del calls
    for name in cfg.backends:
        record = result["backends"][name] = _backend_record(rounds, configs[name])
        ctx.console.print(f"  {name}: teacher p50 {record['teacher']['p50_ms']:.1f} ms, student p50 "
                          f"{record['student']['p50_ms']:.1f} ms -> {record['speedup']:.2f}x (UNet call, batch {batch}, "
                          f"{cfg.precision})")
        for k, v in record.get("int8", {}).items():
            ctx.console.print(f"  {name}: {k} p50 {v['p50_ms']:.1f} ms -> {v['speedup_vs_teacher']:.2f}x over the fp32 teacher")
    every = [c for name in cfg.backends for c in configs[name]]
    result["peers"] = peers(rounds, every, _eager(cfg, every))
    best = result["peers"]
    for k, v in best.items():
        if k.startswith("vs_"):
            ctx.console.print(f"  fastest student ({best['student']['config']}) {v['speedup']:.2f}x over {v['config']} "
                              f"dense ({k})")
    if cfg.estimate:
        result["estimate"] = roofline_estimates(result["backends"], models, inputs, cfg.precision,
                                                result["device"].get("gpu"))
    if cfg.end_to_end is not None:
        result["end_to_end"] = _end_to_end(ctx, models, meta, fp16, int8)
    atomic_write_json(ctx.out / "bench.json", result)
    return {name: v["speedup"] for name, v in result["backends"].items()}


def _device(bench: dict, backend: str) -> str:
    return bench["device"].get("gpu", "cuda") if backend.endswith("cuda") else bench["device"]["cpu"]


def _timed(record: dict, name: str) -> dict | None:
    """A model's latency in one backend's record: the teacher and student, or an INT8 graph timed beside them."""
    timed = record[name] if name in ROLES else record.get("int8", {}).get(name)
    return None if timed is None else {k: v for k, v in timed.items() if not k.startswith("speedup")}


def _size(model, inputs) -> dict:
    macs = measure_macs(model, inputs)
    # macs_dense_layers: convolutions and linear layers only, the count published tables use
    return {"params": count_params(model), "macs": macs.total, "macs_dense_layers": macs.dense_layers}


def report_section(ctx: ReportContext) -> dict:
    bench = ctx.read_json("bench.json")
    batch = bench["shape"][0]
    out: dict = {}
    for name in ctx.entries:
        model = "student" if name == "pruned" else name
        entry = ({k: v for k, v in bench["models"][model].items() if k in ("params", "macs", "macs_dense_layers")}
                 if model in bench["models"] else {})
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
            **{k: e2e[k] for k in ("steps", "guidance_scale", "prompt") + (("scheduler",) if "scheduler" in e2e else ())},
            "backends": {b: _end_to_end_entry(v) for b, v in e2e["backends"].items()}}
    if "semi_structured" in bench:
        out["sparsity"] = {"torch_cuda": {k: bench["semi_structured"][k] for k in ("backend", "dtype", "converted", "skipped")}}
    if "estimate" in bench:
        out["estimate"] = bench["estimate"]
    if "peers" in bench:
        out["peers"] = bench["peers"]
    out.update(_int8_speedups(bench))
    return out


def _end_to_end_entry(record: dict) -> dict:
    """One backend's whole generations: totals, speedup, and each model's p50 per component."""
    entry = {"teacher_p50_ms": record["teacher"]["p50_ms"], "student_p50_ms": record["student"]["p50_ms"],
             "speedup": record["speedup"], "runs": record["teacher"]["runs"]}
    models = {m: record[m] for m in ROLES} | record.get("int8", {})
    if all("components" in v for v in models.values()):
        entry["p50_ms"] = {m: {"total": v["p50_ms"], **{c: part["p50_ms"] for c, part in v["components"].items()}}
                           for m, v in models.items()}
        entry["speedup_by_component"] = record["speedup_by_component"]
        entry.update({f"{m}_speedup_vs_teacher": v["speedup_vs_teacher"] for m, v in record.get("int8", {}).items()})
    return entry


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
    if "peers" in report:
        rows.body += _peer_rows(report["peers"])
    if "end_to_end" in report:
        rows.body += _end_to_end_rows(report["end_to_end"])
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


def _peer_rows(peers: dict) -> list[str]:
    student = peers["student"]
    lines = [f"Against what a user would run without deploykit (same window): the fastest student configuration, "
             f"{student['model']} on {student['config']} ({student['p50_ms']:.1f} ms per UNet call), is", ""]
    for key, v in peers.items():
        if key.startswith("vs_"):
            what = "the fastest dense configuration" if key == "vs_fastest_dense" else "the dense teacher in torch eager"
            lines.append(f"- **{v['speedup']:.2f}x** over {what}, {v['config']} ({v['p50_ms']:.1f} ms; median of "
                         f"per-round ratios {v['speedup_pair_median']:.2f}x)")
    dense = ", ".join(f"{k} {ms:.1f}" for k, ms in peers["measured_p50_ms"]["dense"].items())
    return lines + [f"- dense configurations measured, p50 ms: {dense}", ""]


def _end_to_end_rows(e: dict) -> list[str]:
    lines = [f"End to end, one image: text encoding, {e['steps']} UNet steps at guidance {e['guidance_scale']} "
             f"(batch 2), VAE decode; every backend's models round-robin in one window:", ""]
    if not all("p50_ms" in v for v in e["backends"].values()):  # a report written before components were timed
        lines += ["| backend | teacher p50 s | student p50 s | speedup |", "|---|---|---|---|"]
        lines += [f"| {name} | {v['teacher_p50_ms'] / 1e3:.2f} | {v['student_p50_ms'] / 1e3:.2f} | **{v['speedup']:.2f}x** |"
                  for name, v in e["backends"].items()]
        return lines + [""]
    lines += ["| backend | model | text encoder ms | UNet per step ms | UNet, all steps s | VAE decode ms | total s | "
              "vs teacher |", "|---|---|---|---|---|---|---|---|"]
    for name, v in e["backends"].items():
        total = v["p50_ms"]["teacher"]["total"]
        for m, p in v["p50_ms"].items():
            lines.append(f"| {name} | {m} | {p['text_encoder']:.1f} | {p['unet_per_step']:.1f} | {p['unet'] / 1e3:.2f} | "
                         f"{p['vae_decoder']:.1f} | {p['total'] / 1e3:.2f} | **{total / p['total']:.2f}x** |")
    return lines + ["", "Speedup by component (teacher p50 / student p50): " + "; ".join(
        f"{name}: " + ", ".join(f"{c} {x:.2f}x" for c, x in v["speedup_by_component"].items())
        for name, v in e["backends"].items() if "speedup_by_component" in v), ""]


def publish(ctx: PublishContext) -> None:
    from deploykit.report.plots import latency_bars

    latency_bars(ctx.into["plots"] / "latency.png", json.loads((ctx.folder / "bench.json").read_text()))


BENCH = StageSpec(name="bench", version="3", config=BenchStage, reads=("teacher", "student"),
                  optional_reads=("onnx", "onnx_int8"), writes={"bench": "."}, run=run, check=check, preflight=preflight,
                  depends_on=(*MODEL_PACKAGES, *ONNX_PACKAGES, "openvino"), machine=True, memory=memory,
                  report=report_section, markdown=markdown_rows, publish=publish)
