"""The default recipe's figures, committed: `python benchmarks/digits_cpu.py`.

Builds `recipes/digits_cpu.yaml` (the zoo digits teacher, pruned, distilled, exported, benchmarked
and evaluated on this CPU) into a fresh folder and writes `benchmarks/results/digits_cpu.json` and
`.md` with the machine it ran on and the date. Every number comes from one build: speedups are
teacher p50 / student p50 from the same interleaved run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console

from deploykit.artifact import package_versions
from deploykit.recipe import load_recipe
from deploykit.runner import build

HERE = Path(__file__).resolve().parent
RECIPE = HERE.parent / "recipes" / "digits_cpu.yaml"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    recipe = load_recipe(RECIPE)
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        report = build(recipe, RECIPE, Path(tmp) / "artifact", Console(stderr=True))
        seconds = time.perf_counter() - started
        md = (Path(tmp) / "artifact" / "report.md").read_text()
    versions = package_versions()
    result = {
        "command": "python benchmarks/digits_cpu.py",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "recipe": str(RECIPE.relative_to(HERE.parent)),
        "build_seconds": round(seconds, 1),
        "machine": {"platform": platform.platform(), "python": sys.version.split()[0],
                    **report.get("bench", {}).get("device", {})},
        "packages": {k: versions.get(k) for k in ("torch", "onnxruntime", "diffusers", "torch-pruning")},
        "report": report,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "digits_cpu.json").write_text(json.dumps(result, indent=2) + "\n")
    header = (f"# digits_cpu: the default recipe, measured\n\n`{result['command']}` on {result['date'][:10]}, "
              f"{result['machine'].get('cpu')}, "
              f"{result['machine'].get('threads')} threads, {result['machine']['platform']}; torch "
              f"{result['packages']['torch']}, onnxruntime {result['packages']['onnxruntime']}. "
              f"Whole build {seconds / 60:.1f} min.\n\n")
    body = md.split("\n", 2)[2].replace("](plots/", "](#").replace("](samples/", "](#")
    body = "\n".join(line for line in body.splitlines() if not line.startswith("!["))
    (args.out / "digits_cpu.md").write_text(header + body + "\n")
    print(json.dumps({k: report.get(k) for k in ("speedup", "macs_ratio")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
