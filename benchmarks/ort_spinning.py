"""Does ONNX Runtime's idle-thread spinning move the bench's figures? `python benchmarks/ort_spinning.py ARTIFACT`.

ONNX Runtime's default (``session.intra_op.allow_spinning = 1``) keeps a session's threads
busy-waiting after each call. The bench times several sessions round-robin (fp32 and INT8, teacher
and student), so the idle sessions' threads compete with the one being timed. This script times the
UNets of a built artifact with a quantize stage (its stage cache: fp32 and INT8 graphs) in four
windows, each repeated ``--repeats`` times in alternation: two sessions (fp32 teacher and student)
and four (plus the INT8 graphs), each with spinning on (ONNX Runtime's default) and off (what
deploykit uses: :func:`deploykit.runtime.backends.ort_session_options`). Results go to
`benchmarks/results/ort_spinning.{json,md}`.

    python benchmarks/recipe_build.py recipes/digits_int8_cpu.yaml --keep /tmp/digits-int8
    python benchmarks/ort_spinning.py /tmp/digits-int8
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
from pathlib import Path

import numpy as np

from deploykit.artifact import package_versions
from deploykit.bench import measure_group
from deploykit.bench.machine import command_line, device_info
from deploykit.runtime.backends import OnnxRuntimeBackend, ort_session_options
from deploykit.stages.data import teacher_meta

HERE = Path(__file__).resolve().parent
SPIN_KEYS = ("session.intra_op.allow_spinning", "session.inter_op.allow_spinning")


def spinning_backend(path: Path, spinning: bool) -> OnnxRuntimeBackend:
    """deploykit's ONNX Runtime backend with idle-thread spinning set as asked."""
    options = ort_session_options(quiet=True)
    for key in SPIN_KEYS:
        options.add_session_config_entry(key, "1" if spinning else "0")
    return OnnxRuntimeBackend(path, options=options)


def graphs(artifact: Path) -> dict[str, Path]:
    export, quantize = (sorted(artifact.glob(f"stages/*-{s}-*"))[-1] for s in ("export", "quantize"))
    return {"teacher": export / "teacher/unet/model.onnx", "student": export / "student/unet/model.onnx",
            "teacher-int8": quantize / "teacher/unet/model.onnx", "student-int8": quantize / "student/unet/model.onnx"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    meta = teacher_meta(sorted(args.artifact.glob("stages/*-teacher-*"))[-1])
    rng = np.random.default_rng(0)
    inputs = [rng.standard_normal((args.batch, *meta["sample_shape"]), dtype=np.float32),
              np.full((args.batch,), 500, dtype=np.int64)]
    paths = graphs(args.artifact)
    windows = {f"{n} sessions, spinning {'on' if spin else 'off'}": (n, spin) for n in (2, 4) for spin in (True, False)}
    measured: dict[str, list[dict]] = {w: [] for w in windows}
    load_before = os.getloadavg()
    for repeat in range(args.repeats):
        for window, (n, spin) in windows.items():
            backends = {m: spinning_backend(p, spin) for m, p in list(paths.items())[:n]}
            lat = measure_group({m: (lambda b=b: b.run_numpy(*inputs)) for m, b in backends.items()}, args.warmup, args.runs)
            measured[window].append({m: v.p50_ms for m, v in lat.items()})
            print(f"repeat {repeat + 1}, {window}: " + ", ".join(f"{m} {v.p50_ms:.1f} ms" for m, v in lat.items()),
                  file=sys.stderr, flush=True)
            del backends
    load_after = os.getloadavg()
    summary = {w: {m: statistics.median(r[m] for r in runs) for m in runs[0]} for w, runs in measured.items()}
    result = {"command": command_line("benchmarks/ort_spinning.py"),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "artifact_recipe": json.loads((args.artifact / "report.json").read_text()).get("recipe"),
              "shape": list(inputs[0].shape), "warmup": args.warmup, "runs": args.runs, "repeats": args.repeats,
              "load_average": {"before": list(load_before), "after": list(load_after)},
              "machine": {**device_info(), "platform": platform.platform()},
              "packages": {k: package_versions().get(k) for k in ("onnxruntime",)},
              "p50_ms_median_over_repeats": summary, "p50_ms_each_repeat": measured}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ort_spinning.json").write_text(json.dumps(result, indent=2) + "\n")
    m = result["machine"]
    lines = ["# ONNX Runtime idle-thread spinning and round-robin timing", "",
             f"UNet graphs of `{result['artifact_recipe']}` (fp32 export and INT8 QDQ), input "
             f"{'x'.join(map(str, result['shape']))}, {m['cpu']}, {m['threads']} threads, onnxruntime "
             f"{result['packages']['onnxruntime']}; {result['date'][:10]}. Each window: the sessions round-robin, "
             f"{args.runs} rounds after {args.warmup} warm-up rounds; the four windows alternate, {args.repeats} times; "
             f"p50 ms, median over the repeats. Load average (1 min) {load_before[0]:.2f} before, {load_after[0]:.2f} after.",
             "", "| window | teacher | student | teacher-int8 | student-int8 | teacher / student |", "|---|---|---|---|---|---|"]
    for window, v in summary.items():
        cells = [f"{v[k]:.1f}" if k in v else "–" for k in ("teacher", "student", "teacher-int8", "student-int8")]
        lines.append(f"| {window} | {' | '.join(cells)} | {v['teacher'] / v['student']:.2f}x |")
    lines += ["", f"Command: `{result['command']}`", ""]
    (args.out / "ort_spinning.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
