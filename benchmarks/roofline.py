"""Roofline estimate beside measured latency: this CPU (measured here) and the H100 (committed figures).

`python benchmarks/roofline.py` (or `--only digits|sd15|h100 ...` to redo some parts and keep the rest)

CPU: the CPU's peaks are measured by this script (``deploykit.bench.roofline.measure_cpu``: the best
of repeated 2048x2048 fp32 sgemms for FLOP/s, the best of repeated 256 MB copies for bandwidth, read
+ write), not taken from a data sheet. Each model's per-op FLOPs and bytes are counted on one forward
pass and the estimate (sum over ops of max(FLOPs / peak, bytes / bandwidth), no per-op floor on CPU)
is set beside the same model's latency measured in the same run. Models: the zoo digits teacher at
batch 32 (bench's default) and its magnitude-pruned student, torch eager and ONNX Runtime, interleaved;
the SD1.5 UNet topology (random weights) at 256x256, batch 2, dense and magnitude-pruned to 50% of the
MACs, channels rounded to 8 (the models of `benchmarks/results/sd_speed_sd15_cpu.md`, whose ONNX Runtime
figures are quoted beside ours), torch eager, one after the other (both in fp32 at once do not fit
beside the other work on this shared machine).

H100: SD1.5 at 512x512, batch 2, fp16, counted on the meta device, against
`benchmarks/results/sd_speed_sd15_cuda.md` (torch eager and CUDA-graph replay of the same models;
pruned variants rebuilt here with that run's settings, magnitude, channels rounded to 64, when 8 GB
are free). Estimates with the data sheet's peaks plus a 2 us per-kernel floor; the eager column shows
the per-op overhead the measurement implies.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
from pathlib import Path

import torch

from deploykit.bench import measure_pair
from deploykit.bench.machine import command_line, device_info
from deploykit.bench.roofline import DEVICES, device_record, estimate, measure_cpu, op_costs, top_layers, totals
from deploykit.models import count_macs, count_params
from deploykit.models.inputs import example_unet_inputs
from deploykit.prune import PruneConfig, prune_to_macs
from deploykit.runtime import OnnxRuntimeBackend, TorchBackend

HERE = Path(__file__).resolve().parent
PARTS = ["digits", "sd15", "h100"]
CUDA_RESULTS = HERE / "results" / "sd_speed_sd15_cuda.json"
CPU_RESULTS = HERE / "results" / "sd_speed_sd15_cpu.json"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _cost_record(model, inputs, cpu) -> dict:
    costs = op_costs(model, inputs)
    return {"totals": totals(costs), "estimate": estimate(costs, cpu, "fp32", launch_s=0.0),
            "top_layers": top_layers(costs, cpu, "fp32", n=5)}


def cpu_pair(label: str, teacher, student, inputs, cpu, warmup: int, runs: int, onnx_dir: Path | None) -> dict:
    rows = {}
    for role, model in (("dense", teacher), ("pruned", student)):
        rows[role] = {"params": count_params(model), "macs": count_macs(model, inputs), **_cost_record(model, inputs, cpu)}
        log(f"{label} {role}: estimate {rows[role]['estimate']['ms']:.1f} ms")
    measured = {}
    t, s = TorchBackend(teacher), TorchBackend(student)
    pair = measure_pair(lambda: t(*inputs), lambda: s(*inputs), warmup, runs)
    measured["torch-cpu"] = {"dense": pair.teacher.__dict__, "pruned": pair.student.__dict__}
    log(f"{label} torch-cpu: dense {pair.teacher.p50_ms:.1f} ms, pruned {pair.student.p50_ms:.1f} ms")
    if onnx_dir is not None:
        from deploykit.export import export_unet

        paths = {}
        for role, model in (("dense", teacher), ("pruned", student)):
            paths[role] = export_unet(model, onnx_dir / label / role / "model.onnx", inputs)
        t, s = OnnxRuntimeBackend(paths["dense"]), OnnxRuntimeBackend(paths["pruned"])
        pair = measure_pair(lambda: t(*inputs), lambda: s(*inputs), warmup, runs)
        measured["onnxruntime-cpu"] = {"dense": pair.teacher.__dict__, "pruned": pair.student.__dict__}
        log(f"{label} onnxruntime-cpu: dense {pair.teacher.p50_ms:.1f} ms, pruned {pair.student.p50_ms:.1f} ms")
        del t, s
    return {"models": rows, "measured": measured}


def digits(cpu, warmup: int, runs: int, onnx_dir: Path) -> dict:
    from deploykit.models import load_teacher

    teacher = load_teacher("zoo:digits").model.eval()
    inputs = example_unet_inputs(teacher, 32)
    student, result = prune_to_macs(teacher, example_unet_inputs(teacher, 4), PruneConfig(macs_target=0.5, round_to=8))
    out = cpu_pair("digits", teacher, student, inputs, cpu, warmup, runs, onnx_dir)
    return {"model": "zoo:digits", "shape": list(inputs[0].shape), "macs_ratio": result.macs_ratio,
            "prune": "magnitude, macs_target 0.5, round_to 8", **out}


def _mem_available_gb() -> float:
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("MemAvailable")) / 2 ** 20


def _prune_sd15(target: float, round_to: int):
    """Magnitude-prune the SD1.5 topology (fp32, random weights, seed 0) as sd_speed.py does; returns the
    student and the prune result. Needs about 5.5 GB (teacher and student at once)."""
    from deploykit.models.topologies import build_unet

    if _mem_available_gb() < 8:
        raise SystemExit(f"SD1.5 pruning needs about 8 GB free (room for the other work on this machine), "
                         f"{_mem_available_gb():.1f} GB available: run it later (--only sd15 h100 adds to the existing results)")
    teacher = build_unet("sd15")
    student, result = prune_to_macs(teacher, example_unet_inputs(teacher, 1, size=32),
                                    PruneConfig(macs_target=target, round_to=round_to, ignored=None))
    del teacher
    gc.collect()
    return student, result


def sd15_cpu(cpu, warmup: int, runs: int) -> dict:
    """Dense and pruned are timed one after the other, not interleaved: both in fp32 at once (5 GB)
    did not fit beside the other work on this shared machine."""
    from deploykit.bench.latency import measure_group
    from deploykit.models.topologies import build_unet

    student, result = _prune_sd15(0.5, 8)
    rows, measured = {}, {"torch-cpu": {}}
    for variant in ("pruned", "dense"):
        model = student if variant == "pruned" else build_unet("sd15")
        student = None
        inputs = example_unet_inputs(model, 2, size=32)
        rows[variant] = {"params": count_params(model), "macs": count_macs(model, inputs), **_cost_record(model, inputs, cpu)}
        backend = TorchBackend(model)
        measured["torch-cpu"][variant] = measure_group({variant: lambda b=backend: b(*inputs)}, warmup, runs)[variant].__dict__
        log(f"sd15 {variant}: estimate {rows[variant]['estimate']['ms']:.1f} ms, "
            f"torch-cpu {measured['torch-cpu'][variant]['p50_ms']:.1f} ms")
        del model, backend
        gc.collect()
    committed = json.loads(CPU_RESULTS.read_text())
    out = {"models": {"dense": rows["dense"], "pruned": rows["pruned"]}, "measured": measured,
           "timing": "dense and pruned timed one after the other (not interleaved: memory)"}
    out["committed_onnxruntime_cpu"] = {
        "source": "benchmarks/results/sd_speed_sd15_cpu.md (" + committed["command"] + ")",
        "dense": committed["backends"]["onnxruntime-cpu"]["dense"]["p50_ms"],
        "pruned": committed["backends"]["onnxruntime-cpu"]["pruned-50"]["p50_ms"],
        "params": {"dense": committed["models"]["dense"]["params"], "pruned": committed["models"]["pruned-50"]["params"]}}
    return {"model": "sd15 topology, random weights", "resolution": 256, "shape": [2, 4, 32, 32],
            "macs_ratio": result.macs_ratio, "prune": "magnitude, macs_target 0.5, round_to 8",
            **out}


def _meta_fp16(model):
    return model.to(device="meta", dtype=torch.float16).eval()


def sd15_h100(targets: list[float]) -> dict:
    """SD1.5 at 512x512 b2 fp16 on the H100, dense and pruned as sd_speed.py --device cuda prunes them."""
    from deploykit.models.topologies import build_unet

    committed = json.loads(CUDA_RESULTS.read_text())
    h100 = DEVICES["h100-sxm"]
    variants = {}
    if _mem_available_gb() < 8:
        log(f"h100: {_mem_available_gb():.1f} GB available, pruned variants need about 8 GB free: dense only")
        targets = []
    for target in targets:
        student, result = _prune_sd15(target, 64)
        variants[f"pruned-{round(target * 100)}"] = _meta_fp16(student)
        log(f"h100: pruned to {result.macs_ratio:.3f} (target {target})")
        del student
        gc.collect()
    with torch.device("meta"):
        variants = {"dense": _meta_fp16(build_unet("sd15")), **variants}
    rows = {}
    for name, model in variants.items():
        inputs = tuple(x.to("meta", torch.float16) if x.is_floating_point() else x.to("meta")
                       for x in example_unet_inputs(model, 2, size=64))
        costs = op_costs(model, inputs)
        est = estimate(costs, h100, "fp16")
        measured = {b: committed["backends"][b][name]["p50_ms"] for b in ("torch-cuda", "torch-cuda-graphs")
                    if name in committed["backends"].get(b, {})}
        implied = {b: (m - est["roofline_ms"]) / est["ops"] * 1e3 for b, m in measured.items()}
        rows[name] = {"params": count_params(model), "committed_params": committed["models"].get(name, {}).get("params"),
                      "totals": totals(costs), "estimate": est, "measured_p50_ms": measured,
                      "implied_us_per_op": implied}
        log(f"h100 {name}: estimate {est['ms']:.2f} ms (roofline {est['roofline_ms']:.2f}), measured {measured}")
    return {"device": device_record(h100), "resolution": 512, "shape": [2, 4, 64, 64], "precision": "fp16",
            "source": "benchmarks/results/sd_speed_sd15_cuda.md (" + committed["command"] + ", "
                      + committed["machine"].get("gpu", "H100") + ")", "models": rows}


def _ms(v: float) -> str:
    return f"{v:.1f}" if v >= 10 else f"{v:.2f}"


def to_markdown(r: dict) -> str:
    lines = ["# Roofline estimate vs measured latency", "",
             "Estimate = sum over ops of max(FLOPs / peak, bytes / bandwidth) (+ a per-op floor on GPUs); "
             "FLOPs and bytes (every tensor read and written, weights included) counted per aten op on one forward "
             "pass; attention counted as one fused kernel. See `deploykit/bench/roofline.py`.", ""]
    parts = [k for k in ("digits", "sd15") if k in r]
    if parts:
        m = r["machine"]
        lines += [f"## This CPU: {m['cpu']}, {m['threads']} threads, torch {m['torch']}", "",
                  "Peaks **measured by the script** in each part's run (best 2048x2048 fp32 sgemm; best 256 MB memcpy, "
                  "read + write): " + "; ".join(
                      f"{k}: {r[k]['cpu_device']['matrix']['fp32'] / 1e9:.1f} GFLOP/s, {r[k]['cpu_device']['bandwidth'] / 1e9:.1f} GB/s"
                      for k in parts) + ". No per-op floor on CPU. The machine is shared (2 cores, other work running), "
                  "so measured figures are noisy.", "",
                  "| model | input | variant | GFLOPs | GB moved | estimate ms | torch-cpu p50 ms | measured / estimate "
                  "| onnxruntime-cpu p50 ms | measured / estimate |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
    for key in parts:
        block = r[key]
        for variant, row in block["models"].items():
            est = row["estimate"]["ms"]
            cells = [block["model"], "x".join(map(str, block["shape"])), variant, f"{row['totals']['flops'] / 1e9:.1f}",
                     f"{row['totals']['bytes'] / 1e9:.2f}", _ms(est)]
            for backend in ("torch-cpu", "onnxruntime-cpu"):
                m = block["measured"].get(backend, {}).get(variant, {}).get("p50_ms")
                note = ""
                if m is None and backend == "onnxruntime-cpu" and "committed_onnxruntime_cpu" in block:
                    m, note = block["committed_onnxruntime_cpu"][variant], " †"
                cells += [(_ms(m) + note) if m is not None else "–", f"{m / est:.1f}x" if m is not None else "–"]
            lines.append("| " + " | ".join(cells) + " |")
    for key in parts:
        b = r[key]
        lines.append("")
        lines.append(f"{b['model']}: {b['prune']}, MACs ratio {b['macs_ratio']:.3f}; {b['runs']} timed runs after {b['warmup']} "
                     f"warm-up runs, " + b.get("timing", "dense and pruned interleaved in one run per backend") + ".")
    if "sd15" in r:
        lines += ["", f"† quoted from {r['sd15']['committed_onnxruntime_cpu']['source']}: same models (same seed, "
                  f"pruning settings and parameter counts: {r['sd15']['committed_onnxruntime_cpu']['params']}), "
                  "another run."]
    if "h100" in r:
        h = r["h100"]
        d = h["device"]
        lines += ["", f"## {d['name']}: SD1.5 UNet, 512x512, batch 2, fp16", "",
                  f"Peaks from the data sheet ({d['source']}): {d['matrix']['fp16'] / 1e12:.0f} TFLOPS fp16 dense tensor, "
                  f"{d['vector'] / 1e12:.1f} TFLOPS fp32 vector, {d['bandwidth'] / 1e12:.2f} TB/s; per-op floor "
                  f"{d['launch_s'] * 1e6:.0f} us. Measured: {h['source']}.", "",
                  "| variant | params | GFLOPs | GB moved | ops | roofline ms | estimate ms (with floor) | "
                  "CUDA graphs p50 ms | graphs / estimate | eager p50 ms | implied eager overhead us/op |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for name, row in h["models"].items():
            e, m = row["estimate"], row["measured_p50_ms"]
            graphs, eager = m.get("torch-cuda-graphs"), m.get("torch-cuda")
            ratio = f"{graphs / e['ms']:.1f}x" if graphs else "–"
            lines.append(f"| {name} | {row['params'] / 1e6:.0f}M (committed {(row['committed_params'] or 0) / 1e6:.0f}M) | "
                         f"{row['totals']['flops'] / 1e9:.0f} | {row['totals']['bytes'] / 1e9:.2f} | {e['ops']} | "
                         f"{e['roofline_ms']:.2f} | {e['ms']:.2f} | {_ms(graphs) if graphs else '–'} | "
                         f"{ratio} | {_ms(eager) if eager else '–'} | "
                         f"{row['implied_us_per_op'].get('torch-cuda', float('nan')):.0f} |")
        differ = [n for n, row in h["models"].items()
                  if row["committed_params"] and abs(row["params"] / row["committed_params"] - 1) > 0.02]
        if differ:
            lines += ["", f"**{', '.join(differ)}: not like for like.** The pruning code has changed since the H100 run "
                      "(see the params column): those rows estimate today's pruned architecture against the time measured "
                      "for the earlier one. The dense row compares the same model."]
    lines += ["", "Commands (each part can be re-run alone; the others are kept):", ""]
    lines += [f"- {part}: `{cmd}`" for part, cmd in r.get("commands", {}).items()]
    lines.append("")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--runs", type=int, default=8)
    parser.add_argument("--only", nargs="*", default=PARTS, choices=PARTS,
                        help="run these parts; the others are kept from the existing results file")
    parser.add_argument("--name", default="roofline_cpu")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    torch.manual_seed(0)
    path = args.out / f"{args.name}.json"
    previous = json.loads(path.read_text()) if path.is_file() and set(args.only) != set(PARTS) else {}
    cpu = measure_cpu()
    log(f"cpu: {cpu.matrix['fp32'] / 1e9:.1f} GFLOP/s, {cpu.bandwidth / 1e9:.1f} GB/s")
    result: dict = {**previous, "machine": device_info()}
    commands = dict(previous.get("commands", {}))
    work = args.out / f".{args.name}-onnx"
    for part in args.only:
        if part == "h100":
            result["h100"] = sd15_h100([0.5, 0.3])
        else:
            # each CPU part carries the peaks measured in its own run
            result[part] = {**(digits(cpu, args.warmup, args.runs, work) if part == "digits" else sd15_cpu(cpu, args.warmup, args.runs)),
                            "cpu_device": device_record(cpu), "warmup": args.warmup, "runs": args.runs}
        commands[part] = command_line("benchmarks/roofline.py")
        gc.collect()
    result["commands"] = commands
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(result, indent=1))
    (args.out / f"{args.name}.md").write_text(to_markdown(result))
    import shutil

    shutil.rmtree(work, ignore_errors=True)
    print(to_markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
