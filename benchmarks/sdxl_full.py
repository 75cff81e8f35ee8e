"""Full-size SDXL UNet on a CPU: prune, export to ONNX, check against torch, time dense against pruned.

    python benchmarks/sdxl_full.py            # 512x512 (latent 64x64), batch 2, fp32, random weights

The SDXL UNet holds 2.6B parameters, 10 GB in fp32; this script is staged so that it fits a 24 GB
machine: the pruning search and the torch timing hold dense + pruned (15 GB); the dense model is
freed before the student's ONNX check and rebuilt from its seed for its own export and check, at a
small latent (the weights, not the activations, are what the check is about), torch first and
ONNX Runtime after it. Each phase records the process's resident and peak memory.

Random weights measure speed, never quality. Timings are round-robin (dense and pruned alternate in
one window), so a speedup is dense p50 / pruned p50 from the same run.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from deploykit.bench import measure_group
from deploykit.bench.machine import command_line, device_info
from deploykit.export import compare_with_torch, export_unet
from deploykit.models import count_macs, count_params
from deploykit.models.inputs import example_unet_inputs, unet_input_names
from deploykit.models.topologies import build_unet
from deploykit.prune import PruneConfig, prune_to_macs
from deploykit.runtime import OnnxRuntimeBackend, TorchBackend

HERE = Path(__file__).resolve().parent
PHASES: list[dict] = []


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def memory_gb() -> dict:
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    kb = {k: int(status[k].split()[0]) for k in ("VmRSS", "VmHWM") if k in status}
    return {"rss_gb": round(kb.get("VmRSS", 0) / 2**20, 2), "peak_gb": round(kb.get("VmHWM", 0) / 2**20, 2)}


def phase(name: str, started: float, **extra) -> dict:
    record = {"phase": name, "seconds": round(time.perf_counter() - started, 1), **memory_gb(), **extra}
    PHASES.append(record)
    log(f"{name}: {record['seconds']} s, RSS {record['rss_gb']} GB (peak so far {record['peak_gb']} GB)"
        + "".join(f", {k} {v}" for k, v in extra.items()))
    return record


def check_inputs(model, batch: int, latent: int, seed: int) -> list[dict]:
    names = unet_input_names(model)
    return [dict(zip(names, (x.numpy() for x in example_unet_inputs(model, batch, size=latent, seed=seed))))]


def numpy_check(actual, reference, atol: float, rtol: float) -> dict:
    import numpy as np

    diff = np.abs(actual.astype(np.float64) - reference)
    return {"passed": bool((diff <= atol + rtol * np.abs(reference)).all()), "max_abs_error": float(diff.max()),
            "max_rel_error": float((diff / np.maximum(np.abs(reference), 1e-12)).max()), "atol": atol, "rtol": rtol}


def to_markdown(r: dict) -> str:
    m = r["machine"]
    d, p = r["models"]["dense"], r["models"]["pruned"]
    lines = ["# Full-size SDXL UNet on a CPU: prune, export, check, time (random weights)", "",
             f"{r['resolution']}x{r['resolution']} images (UNet input {'x'.join(map(str, r['shape']))}), batch "
             f"{r['shape'][0]}, fp32; {m['cpu']} ({m['threads']} threads), torch {m['torch']}. Magnitude pruning to a MACs "
             f"target of {r['macs_target']}, channels rounded to {r['round_to']}, default dense layers. Round-robin timing, "
             f"{r['runs']} rounds after {r['warmup']} warm-up round(s).", "",
             "| model | params | GMACs per call | MACs ratio |", "|---|---|---|---|",
             f"| dense | {d['params'] / 1e9:.2f}B | {d['macs'] / 1e9:.0f} | 1.000 |",
             f"| pruned | {p['params'] / 1e9:.2f}B | {p['macs'] / 1e9:.0f} | {p['macs_ratio']:.3f} |", "",
             "| backend | dense p50 s | pruned p50 s | speedup |", "|---|---|---|---|"]
    for backend, rows in r["backends"].items():
        lines.append(f"| {backend} | {rows['dense']['p50_ms'] / 1e3:.2f} | {rows['pruned']['p50_ms'] / 1e3:.2f} | "
                     f"**{rows['dense']['p50_ms'] / rows['pruned']['p50_ms']:.2f}x** |")
    lines += ["", "ONNX Runtime vs torch (polygraphy):", ""]
    for name, c in r["onnx"].items():
        lines.append(f"- {name}: max |diff| {c['check']['max_abs_error']:.1e} at batch {c['check_batch']}, latent "
                     f"{c['check_latent']} ({'passed' if c['check']['passed'] else 'FAILED'} at atol {c['check']['atol']:g}, "
                     f"rtol {c['check']['rtol']:g}; {c['checked_by']}); {c['bytes'] / 1e9:.2f} GB of ONNX, "
                     f"exported in {c['export_seconds']:.0f} s")
    lines += ["", f"Pruning search: {r['prune_seconds']:.0f} s. Memory by phase (GB resident after it; peak of the process so far):", "",
              "| phase | seconds | RSS GB | peak GB |", "|---|---|---|---|"]
    lines += [f"| {ph['phase']} | {ph['seconds']} | {ph['rss_gb']} | {ph['peak_gb']} |" for ph in r["phases"]]
    if r.get("note"):
        lines += ["", r["note"]]
    lines += ["", f"Command: `{r['command']}`", ""]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--topology", default="sdxl", choices=["sdxl", "sd15", "tiny-sdxl", "tiny-sd"])
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--target", type=float, default=0.5)
    parser.add_argument("--round-to", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--check-latent", type=int, default=16, help="latent side of the dense ONNX check")
    parser.add_argument("--note", default="", help="a line for the Markdown (e.g. what else ran on the machine)")
    parser.add_argument("--name", help="results file stem (default: <topology>_full_cpu)")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    latent = args.resolution // 8

    t = time.perf_counter()
    teacher = build_unet(args.topology, seed=0)
    phase("build dense", t)
    t = time.perf_counter()
    student, pr = prune_to_macs(teacher, example_unet_inputs(teacher, 1, size=latent),
                                PruneConfig(criterion="magnitude", macs_target=args.target, round_to=args.round_to, ignored=None))
    prune_seconds = time.perf_counter() - t
    phase("prune", t, macs_ratio=round(pr.macs_ratio, 4))

    torch.set_grad_enabled(False)  # the pruning search traced with autograd; from here on, inference only
    inputs = example_unet_inputs(teacher, 2, size=latent)
    macs = {"dense": count_macs(teacher, inputs), "pruned": count_macs(student, inputs)}
    models = {name: {"params": count_params(m), "macs": macs[name], "macs_ratio": macs[name] / macs["dense"]}
              for name, m in (("dense", teacher), ("pruned", student))}
    result = {"command": command_line("benchmarks/sdxl_full.py"), "topology": args.topology, "random_weights": True,
              "resolution": args.resolution, "shape": list(inputs[0].shape), "macs_target": args.target,
              "round_to": args.round_to, "warmup": args.warmup, "runs": args.runs, "prune_seconds": prune_seconds,
              "pruning_ratio": pr.pruning_ratio, "machine": {**device_info(False), "platform": platform.platform()},
              "models": models, "backends": {}, "onnx": {}, "note": args.note}

    t = time.perf_counter()
    runners = {"dense": TorchBackend(teacher), "pruned": TorchBackend(student)}
    lat = measure_group({n: (lambda r=r: r(*inputs)) for n, r in runners.items()}, args.warmup, args.runs)
    result["backends"]["torch-cpu"] = {n: v.__dict__ for n, v in lat.items()}
    del runners
    phase("torch-cpu timing", t, speedup=round(lat["dense"].p50_ms / lat["pruned"].p50_ms, 3))

    with tempfile.TemporaryDirectory(dir=args.out.parent) as tmp:
        paths = {n: Path(tmp) / n / "model.onnx" for n in ("dense", "pruned")}

        def export(name: str, model) -> None:
            t = time.perf_counter()
            export_unet(model, paths[name], example_unet_inputs(model, 2, size=latent))
            size = sum(f.stat().st_size for f in paths[name].parent.iterdir())
            result["onnx"][name] = {"export_seconds": time.perf_counter() - t, "bytes": size}
            phase(f"export {name}", t, gb=round(size / 1e9, 2))

        export("pruned", student)
        del teacher
        gc.collect()
        t = time.perf_counter()
        check = compare_with_torch(student, paths["pruned"], check_inputs(student, 2, latent, 1), atol=1e-3, rtol=1e-2)
        result["onnx"]["pruned"].update(check=check, check_batch=2, check_latent=latent, checked_by="polygraphy")
        del student
        gc.collect()
        phase("check pruned", t, max_abs_error=f"{check['max_abs_error']:.1e}")

        teacher = build_unet(args.topology, seed=0)  # the same seed, the same weights as the model that was pruned
        export("dense", teacher)
        # torch and ONNX Runtime one after the other: both at once would hold the 10 GB of weights twice
        t = time.perf_counter()
        feed = check_inputs(teacher, 1, args.check_latent, 1)[0]
        reference = TorchBackend(teacher)(*(torch.from_numpy(v) for v in feed.values())).numpy()
        del teacher
        gc.collect()
        check = numpy_check(OnnxRuntimeBackend(paths["dense"]).run_numpy(*feed.values()), reference, atol=1e-3, rtol=1e-2)
        gc.collect()
        result["onnx"]["dense"].update(check=check, check_batch=1, check_latent=args.check_latent,
                                       checked_by="numpy, polygraphy's rule |a - b| <= atol + rtol * |b|")
        phase("check dense", t, max_abs_error=f"{check['max_abs_error']:.1e}")

        t = time.perf_counter()
        sessions = {n: OnnxRuntimeBackend(p) for n, p in paths.items()}
        lat = measure_group({n: (lambda s=s: s(*inputs)) for n, s in sessions.items()}, args.warmup, args.runs)
        result["backends"]["onnxruntime-cpu"] = {n: v.__dict__ for n, v in lat.items()}
        del sessions
        gc.collect()
        phase("onnxruntime-cpu timing", t, speedup=round(lat["dense"].p50_ms / lat["pruned"].p50_ms, 3))

    result["phases"] = PHASES
    stem = args.name or f"{args.topology}_full_cpu"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / f"{stem}.md").write_text(to_markdown(result))
    log(f"wrote {args.out / stem}.json and .md")
    ok = all(v["check"]["passed"] for v in result["onnx"].values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
