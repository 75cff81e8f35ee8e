"""Speed matrix of the SD UNet topologies, dense against pruned, with random weights.

CPU (the committed table): `python benchmarks/sd_speed.py`
    SD1.5 topology, 256x256 images (latent 32x32), batch 2 (classifier-free guidance), fp32;
    torch eager and ONNX Runtime; dense and pruned (magnitude) to 50% and 30% of the MACs.
GPU: `python benchmarks/sd_speed.py --device cuda`
    SD1.5 topology, 512x512, batch 2, fp16; torch eager, torch.compile (default mode) and
    torch.compile with CUDA graphs (mode reduce-overhead): at batch 2 the eager UNet is bound by
    kernel launches, and only graph replay shows what the GPU's arithmetic costs.

Random weights measure speed, never quality. Within one backend every model is timed round-robin in
the same window (each round starts with a different model), so a speedup is dense p50 / pruned p50
from the same run. The MACs ratio is printed beside each measured speedup.
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
from deploykit.models import count_macs, count_params
from deploykit.models.inputs import example_unet_inputs
from deploykit.models.topologies import build_unet
from deploykit.prune import PruneConfig, prune_to_macs
from deploykit.runtime import OnnxRuntimeBackend, TorchBackend

HERE = Path(__file__).resolve().parent


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def prune_variants(teacher, inputs, targets: list[float], round_to: int) -> dict:
    variants = {"dense": {"model": teacher, "macs_target": 1.0, "prune_seconds": 0.0}}
    for target in targets:
        started = time.perf_counter()
        student, result = prune_to_macs(teacher, inputs, PruneConfig(criterion="magnitude", macs_target=target,
                                                                       round_to=round_to, ignored=None))
        seconds = time.perf_counter() - started
        log(f"pruned to {result.macs_ratio:.3f} of the MACs (target {target}) in {seconds:.0f} s")
        variants[f"pruned-{round(target * 100)}"] = {"model": student, "macs_target": target, "prune_seconds": seconds,
                                                      "pruning_ratio": result.pruning_ratio}
    return variants


def backends_for(device: str, compile_: bool) -> list[str]:
    if device == "cuda":
        return ["torch-cuda"] + (["torch-cuda-compile", "torch-cuda-graphs"] if compile_ else [])
    return ["torch-cpu", "onnxruntime-cpu"]


def make_calls(backend: str, variants: dict, inputs, onnx_dir: Path, dtype: torch.dtype) -> dict:
    if backend.startswith("torch-cuda"):
        compile_mode = {"torch-cuda-compile": "default", "torch-cuda-graphs": "reduce-overhead"}.get(backend)
        runners = {n: TorchBackend(v["model"], "cuda", dtype, compile=compile_mode is not None,
                                   compile_mode=compile_mode or "default") for n, v in variants.items()}
    elif backend == "torch-cpu":
        runners = {n: TorchBackend(v["model"]) for n, v in variants.items()}
    else:
        from deploykit.export import export_unet

        runners = {}
        for name, v in variants.items():
            path = onnx_dir / name / "model.onnx"
            if not path.is_file():
                started = time.perf_counter()
                export_unet(v["model"], path, inputs)
                log(f"exported {name} to ONNX in {time.perf_counter() - started:.0f} s")
            runners[name] = OnnxRuntimeBackend(path)
    return {name: (lambda r=r: r(*inputs)) for name, r in runners.items()}


def to_markdown(result: dict) -> str:
    m = result["machine"]
    lines = [f"# SD UNet speed matrix: {result['topology']} topology, random weights", "",
             f"{result['resolution']}x{result['resolution']} images (UNet input {'x'.join(map(str, result['shape']))}), "
             f"batch {result['shape'][0]}, {result['precision']}; {m.get('gpu') or m['cpu']} "
             f"({m['threads']} CPU threads), torch {m['torch']}. Dense and pruned models timed round-robin in one run "
             f"per backend, {result['runs']} rounds after {result['warmup']} warm-up rounds. Pruning: magnitude, "
             f"channels rounded to {result['round_to']}, default dense layers.", "",
             "| backend | model | MACs ratio | params | p50 ms | p90 ms | speedup vs dense |", "|---|---|---|---|---|---|---|"]
    for backend, rows in result["backends"].items():
        for name, r in rows.items():
            lines.append(f"| {backend} | {name} | {result['models'][name]['macs_ratio']:.3f} | "
                         f"{result['models'][name]['params'] / 1e6:.0f}M | {r['p50_ms']:.1f} | {r['p90_ms']:.1f} | "
                         f"**{r['speedup']:.2f}x** |")
    lines += ["", f"Command: `{result['command']}`", ""]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--topology", default="sd15", choices=["sd15", "sdxl", "tiny-sd", "tiny-sdxl"])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--resolution", type=int, help="image side (default: 256 on CPU, 512 on CUDA)")
    parser.add_argument("--targets", type=float, nargs="+", default=[0.5, 0.3])
    parser.add_argument("--round-to", type=int, help="default: 8 on CPU, 64 on CUDA")
    parser.add_argument("--no-compile", action="store_true", help="CUDA: skip torch.compile")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--name", help="results file stem (default: sd_speed_<topology>_<device>)")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        print("error: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    resolution = args.resolution or (512 if cuda else 256)
    round_to = args.round_to or (64 if cuda else 8)
    dtype = torch.float16 if cuda else torch.float32

    device = "cuda" if cuda else "cpu"
    teacher = build_unet(args.topology).to(device)  # the pruning search runs where the models will run (fp32)
    latent = resolution // 8
    # MACs ratios are per sample; batch 1 traces fastest for the pruning search
    search_inputs = tuple(x.to(device) for x in example_unet_inputs(teacher, 1, size=latent))
    variants = prune_variants(teacher, search_inputs, args.targets, round_to)
    inputs = tuple(x.to(device) for x in example_unet_inputs(teacher, 2, size=latent))
    macs_dense = count_macs(teacher, inputs)
    models = {}
    for name, v in variants.items():
        macs = count_macs(v["model"], inputs)
        models[name] = {"macs": macs, "macs_ratio": macs / macs_dense, "params": count_params(v["model"]),
                        **{k: v[k] for k in ("macs_target", "prune_seconds", "pruning_ratio") if k in v}}
    result = {
        "command": command_line("benchmarks/sd_speed.py"),
        "topology": args.topology, "random_weights": True, "resolution": resolution,
        "shape": list(inputs[0].shape), "precision": "fp16" if cuda else "fp32", "round_to": round_to,
        "warmup": args.warmup, "runs": args.runs,
        "machine": {**device_info(cuda), "platform": platform.platform()},
        "models": models, "backends": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        for backend in backends_for(args.device, not args.no_compile):
            started = time.perf_counter()
            timed_inputs = tuple(x.to(dtype) if x.is_floating_point() else x for x in inputs)
            calls = make_calls(backend, variants, timed_inputs, Path(tmp), dtype)
            latencies = measure_group(calls, args.warmup, args.runs)
            dense = latencies["dense"].p50_ms
            result["backends"][backend] = {n: {**lat.__dict__, "speedup": dense / lat.p50_ms} for n, lat in latencies.items()}
            log(f"{backend} ({time.perf_counter() - started:.0f} s): " + ", ".join(
                f"{n} {lat.p50_ms:.1f} ms ({dense / lat.p50_ms:.2f}x, MACs {models[n]['macs_ratio']:.3f})"
                for n, lat in latencies.items()))
            del calls
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
    stem = args.name or f"sd_speed_{args.topology}_{args.device}"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / f"{stem}.md").write_text(to_markdown(result))
    log(f"wrote {args.out / stem}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
