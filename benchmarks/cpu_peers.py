"""The student against what a CPU user would run without deploykit, every configuration in one window.

`python benchmarks/cpu_peers.py ARTIFACT [--rounds N]` reads a built artifact's stage cache (the
dense teacher and the pruned student as torch models, their fp32 ONNX UNets and the quantize
stage's INT8 QDQ UNets), and times one UNet call of each configuration: torch eager fp32, ONNX
Runtime fp32 and INT8, OpenVINO fp32 and INT8 (the same ONNX files), and OpenVINO in its default
precision on this CPU (bf16 where the CPU has bf16 instructions) for the fp32 graphs and for the float
layers of the INT8 ones, dense and pruned. The fastest student and the fastest dense configuration are
picked from all of them, OpenVINO's default included: on an AMX Xeon bf16 beats INT8 with fp32 float layers.

One window, round-robin: each round visits every configuration in turn (each round starting one
later). On a 23 GB machine the SD1.5 configurations do not all fit in memory at once, so each turn
loads its model, makes one warm-up call and one timed call, and releases it; OpenVINO's compiled
models come from a cache filled before the first round. The figures go to
`benchmarks/results/<name>.json` and `.md`, with the machine, the command, the date and the load average.

    python benchmarks/recipe_build.py recipes/sd15_int8_cpu.yaml --random-weights --keep /tmp/sd15art
    python benchmarks/cpu_peers.py /tmp/sd15art --name sd15_cpu_peers
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from deploykit.artifact import package_versions
from deploykit.bench import Rounds
from deploykit.bench.machine import command_line, device_info
from deploykit.bench.peers import RUNTIME_DEFAULT, Config, peers
from deploykit.models import count_macs, load_model
from deploykit.runtime import TorchBackend, cpu_threads
from deploykit.runtime.backends import onnx_backend
from deploykit.runtime.openvino import OpenVINOBackend
from deploykit.stages.data import example_inputs, teacher_meta

HERE = Path(__file__).resolve().parent


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def stage(artifact: Path, name: str) -> Path:
    found = sorted(artifact.glob(f"stages/*-{name}-*"))
    if not found:
        raise SystemExit(f"error: {artifact} has no {name} stage")
    return found[-1]


def loaders(artifact: Path, cache: Path) -> dict[Config, Callable[[], Callable]]:
    """Configuration -> a function that loads it and returns its UNet call."""
    teacher_dir, export, quantize = stage(artifact, "teacher"), stage(artifact, "export"), stage(artifact, "quantize")
    student_dir = stage(artifact, "prune")
    models = {"teacher": teacher_dir / "model", "student": student_dir / "model"}
    onnx = {r: export / r / "unet" / "model.onnx" for r in models}
    int8 = {f"{r}-int8": quantize / r / "unet" / "model.onnx" for r in models}
    out: dict[Config, Callable[[], Callable]] = {}
    for r, folder in models.items():
        out[Config("torch-cpu", r, "fp32")] = lambda f=folder: TorchBackend(load_model(f))
    for backend in ("onnxruntime-cpu", "openvino-cpu"):
        for m, path in {**onnx, **int8}.items():
            precision = "int8" if m.endswith("-int8") else "fp32"
            out[Config(backend, m, precision)] = (lambda b=backend, p=path: onnx_backend(b, p, cache / b if b == "openvino-cpu" else None))
    for r, path in {**onnx, **int8}.items():
        out[Config("openvino-cpu", r, RUNTIME_DEFAULT)] = lambda p=path: OpenVINOBackend(p, cache_dir=cache / "default",
                                                                                          precision=None)
    return out


def to_markdown(result: dict) -> str:
    m, p = result["machine"], result["peers"]
    lines = [f"# {result['name']}: the student against what a CPU user would run without deploykit", "",
             f"Artifact of `{result['artifact_recipe']}` ({result['resolution']}x{result['resolution']} images, UNet input "
             f"{'x'.join(map(str, result['shape']))}, one UNet call per figure), {m['cpu']}, {m['threads']} threads, "
             f"torch {result['packages']['torch']}, onnxruntime {result['packages']['onnxruntime']}, openvino "
             f"{result['packages']['openvino']}; {result['date'][:10]}. {result['rounds']} rounds, every configuration in "
             "each round (round-robin, each round starting one later; each turn loads its model, one warm-up call, one "
             f"timed call). Load average (1 min) {result['load_average']['before'][0]:.2f} before, "
             f"{result['load_average']['after'][0]:.2f} after, on 2 cores: above 0.5, other sessions' work shared the machine.",
             "", f"OpenVINO `default` is its own inference precision on this CPU: {result['openvino_default_precision']}.", "",
             "| model | MACs ratio | backend | precision | p50 ms | p90 ms | vs dense torch eager fp32 (per-round median) |",
             "|---|---|---|---|---|---|---|"]
    ref = result["configs"]["torch-cpu teacher"]["p50_ms"]
    for v in sorted(result["configs"].values(), key=lambda v: -v["p50_ms"]):
        lines.append(f"| {v['model']} | {result['macs_ratio'] if not v['dense'] else 1.0:.3f} | {v['backend']} | "
                     f"{v['precision']} | {v['p50_ms']:.1f} | {v['p90_ms']:.1f} | **{ref / v['p50_ms']:.2f}x** "
                     f"({v['vs_torch_eager_pair_median']:.2f}x) |")
    def named(label: str) -> str:  # "openvino-cpu default" -> "openvino-cpu default (bf16)"
        return label + (f" ({result['openvino_default_precision']})" if label.endswith(f" {RUNTIME_DEFAULT}") else "")

    lines += ["", f"Fastest student: {p['student']['model']} on {named(p['student']['config'])}, {p['student']['p50_ms']:.1f} ms.", ""]
    for key, v in p.items():
        if key.startswith("vs_"):
            lines.append(f"- `{key}`: **{v['speedup']:.2f}x** over {named(v['config'])} ({v['p50_ms']:.1f} ms; per-round median "
                         f"{v['speedup_pair_median']:.2f}x)")
    if "vs_openvino_default" in result and p["vs_fastest_dense"]["config"] != f"openvino-cpu {RUNTIME_DEFAULT}":
        v = result["vs_openvino_default"]
        lines.append(f"- against OpenVINO's default precision ({result['openvino_default_precision']}, dense): "
                     f"**{v['speedup']:.2f}x** ({v['p50_ms']:.1f} ms)")
    lines += ["", f"Command: `{result['command']}`", ""]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--name", default="sd15_cpu_peers")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    torch.set_num_threads(cpu_threads())
    meta = teacher_meta(stage(args.artifact, "teacher"))
    report = json.loads((args.artifact / "report.json").read_text())
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp)
        load = loaders(args.artifact, cache)
        teacher = load_model(stage(args.artifact, "teacher") / "model")
        inputs = example_inputs(meta, teacher, 2, 0)
        macs_ratio = count_macs(load_model(stage(args.artifact, "prune") / "model"), inputs) / count_macs(teacher, inputs)
        del teacher
        default_precision = "?"
        for config, make in load.items():  # fill OpenVINO's cache: compile time is not what is measured
            if config.backend == "openvino-cpu":
                started = time.perf_counter()
                backend = make()
                default_precision = getattr(backend, "precision", default_precision)
                log(f"compiled {config.key} ({config.precision}) in {time.perf_counter() - started:.0f} s")
                del backend
                gc.collect()
        load_before = os.getloadavg()
        keys = list(load)
        times: dict[str, list[float]] = {c.key: [] for c in keys}
        for i in range(args.rounds):
            for config in keys[i % len(keys):] + keys[:i % len(keys)]:
                call = load[config]()
                call(*inputs)
                started = time.perf_counter()
                call(*inputs)
                times[config.key].append(time.perf_counter() - started)
                del call
                gc.collect()
            log(f"round {i + 1}/{args.rounds}: " + ", ".join(f"{k} {v[-1] * 1e3:.0f}" for k, v in times.items()))
        load_after = os.getloadavg()
    rounds = Rounds(times)
    result = {
        "name": args.name, "command": command_line("benchmarks/cpu_peers.py"),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "artifact_recipe": report.get("recipe"), "resolution": report.get("resolution"), "shape": list(inputs[0].shape),
        "macs_ratio": macs_ratio, "rounds": args.rounds, "openvino_default_precision": default_precision,
        "load_average": {"before": list(load_before), "after": list(load_after)},
        "machine": {**device_info(), "platform": platform.platform()},
        "packages": {k: package_versions().get(k) for k in ("torch", "onnxruntime", "openvino")},
        "configs": {c.key: {"backend": c.backend, "model": c.model, "dense": c.dense,
                              "precision": c.setting.replace(RUNTIME_DEFAULT, f"{RUNTIME_DEFAULT} ({default_precision})"),
                              **rounds.latency(c.key).__dict__,
                              "vs_torch_eager_pair_median": rounds.ratio_median("torch-cpu teacher", c.key)} for c in keys},
        "peers": peers(rounds, keys, Config("torch-cpu", "teacher", "fp32")),
    }
    best = result["peers"]["student"]
    best_key = next(c.key for c in keys if c.label == best["config"] and c.model == best["model"])
    default = rounds.latency("openvino-cpu teacher default").p50_ms
    result["vs_openvino_default"] = {"p50_ms": default, "speedup": default / best["p50_ms"],
                                     "speedup_pair_median": rounds.ratio_median("openvino-cpu teacher default", best_key)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / f"{args.name}.md").write_text(to_markdown(result))
    log(f"wrote {args.out / args.name}.json and .md")
    print(json.dumps(result["peers"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
