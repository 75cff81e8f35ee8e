"""A recipe's build, measured and committed: `python benchmarks/recipe_build.py RECIPE [--random-weights] [--backends ...]`.

Builds RECIPE into a fresh folder with `deploykit build` (in a child process, so that its peak memory
is measured), and writes `benchmarks/results/<name>.json` and `.md`: the build's report, the machine,
the package versions, the command, the date and the load average before and after (other work on a
shared machine inflates absolute times; ratios come from round-robin rounds in one window).
`--backends` replaces the bench stage's backend list (e.g. to add torch-cpu, the peer every user has).

    python benchmarks/recipe_build.py recipes/digits_int8_cpu.yaml --backends torch-cpu onnxruntime-cpu openvino-cpu
    python benchmarks/recipe_build.py recipes/sd15_int8_cpu.yaml --random-weights --backends torch-cpu onnxruntime-cpu
    python benchmarks/recipe_build.py recipes/shapes_jetson_nano.yaml --set distill.denoise_weight=0 --name NAME
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from deploykit.artifact import package_versions
from deploykit.bench.machine import command_line

HERE = Path(__file__).resolve().parent
PACKAGES = ("torch", "onnxruntime", "openvino", "nncf", "diffusers", "torch-pruning")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe", type=Path)
    parser.add_argument("--random-weights", action="store_true")
    parser.add_argument("--backends", nargs="+", help="the bench stage's backends (default: the recipe's)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="one recipe setting for this build, as `deploykit build --set` (repeatable)")
    parser.add_argument("--name", help="results file stem (default: the recipe's file name)")
    parser.add_argument("--keep", type=Path, help="also keep the artifact here (for benchmarks that read its graphs)")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    recipe = yaml.safe_load(args.recipe.read_text())
    overrides = []
    if args.backends:
        if not any(s["stage"] == "bench" for s in recipe["stages"]):
            print(f"error: {args.recipe} has no bench stage", file=sys.stderr)
            return 2
        # --set on the recipe file itself: files it names (prompt files) resolve against its own folder
        overrides = ["--set", f"bench.backends=[{', '.join(args.backends)}]"]
    for setting in args.set:
        overrides += ["--set", setting]
    name = args.name or args.recipe.stem
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "artifact"
        load_before = os.getloadavg()
        started = time.perf_counter()
        cmd = [sys.executable, "-m", "deploykit.cli", "build", str(args.recipe), "--out", str(out), *overrides]
        result = subprocess.run(cmd + (["--random-weights"] if args.random_weights else []))
        seconds = time.perf_counter() - started
        if result.returncode != 0:
            print(f"error: the build exited {result.returncode}", file=sys.stderr)
            return result.returncode
        report = json.loads((out / "report.json").read_text())
        md = (out / "report.md").read_text()
        if args.keep:
            shutil.rmtree(args.keep, ignore_errors=True)
            shutil.copytree(out, args.keep)
    load_after = os.getloadavg()
    versions = package_versions()
    result = {
        "command": command_line("benchmarks/recipe_build.py"),
        "recipe": str(args.recipe),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "build_seconds": round(seconds, 1),
        "peak_rss_kb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,
        "load_average_1_5_15": {"before": [round(x, 2) for x in load_before], "after": [round(x, 2) for x in load_after]},
        "machine": {"platform": platform.platform(), "python": sys.version.split()[0],
                    **report.get("bench", {}).get("device", {})},
        "packages": {k: versions.get(k) for k in PACKAGES},
        "report": report,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    m, p = result["machine"], result["packages"]
    header = (f"# {name}: `{args.recipe}`, measured\n\n`{result['command']}` on {result['date'][:10]}, {m.get('cpu')}, "
              f"{m.get('threads')} threads, {m['platform']}; torch {p['torch']}, onnxruntime {p['onnxruntime']}, "
              f"openvino {p['openvino']}. Whole build {seconds / 60:.1f} min, peak memory "
              f"{result['peak_rss_kb'] / 2**20:.1f} GiB. Load average (1 min) {load_before[0]:.2f} before, "
              f"{load_after[0]:.2f} after, on 2 cores: other sessions' work shared the machine where it is above 0.5.\n\n")
    body = md.split("\n", 2)[2].replace("](plots/", "](#").replace("](samples/", "](#")
    body = "\n".join(line for line in body.splitlines() if not line.startswith("!["))
    (args.out / f"{name}.md").write_text(header + body + "\n")
    print(json.dumps({k: report.get(k) for k in ("speedup", "speedup_int8", "peers")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
