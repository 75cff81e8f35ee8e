"""What 2:4 costs in quality on the zoo teacher, after the same recovery: `python benchmarks/sparse_quality.py`.

Variants of `recipes/digits_sparse_cpu.yaml`, identical but for the sparsity: the teacher pruned to
half its MACs and recovered (no 2:4); the same plus 2:4 masks with fixed masks during recovery; the
same with SR-STE (masks re-chosen every step). Same seed, same recovery steps, same evaluation
(FID on the zoo classifier's features against the real digits, PSNR / SSIM against the teacher, the
same noise for every model). The pruned and recovered students of each variant are in one table.

Quality only: on a CPU 2:4 has no kernels (the zeros run densely), and the GPU speed of 2:4 is
`benchmarks/sparse_gpu.py`'s question.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import yaml
from rich.console import Console

from deploykit.artifact import package_versions
from deploykit.bench.machine import command_line, cpu_name
from deploykit.recipe import load_recipe
from deploykit.runner import build

HERE = Path(__file__).resolve().parent
RECIPE = HERE.parent / "recipes" / "digits_sparse_cpu.yaml"
METRICS = ("fid", "psnr_vs_teacher", "ssim_vs_teacher")


def variant(base: dict, name: str, mask_mode: str | None) -> dict:
    """``base`` without export / bench (quality only), with or without its sparsify stage."""
    stages = [dict(s) for s in base["stages"] if s["stage"] not in ("export", "bench")]
    if mask_mode is None:
        stages = [s for s in stages if s["stage"] != "sparsify"]
    for s in stages:
        if s["stage"] == "distill":
            s.pop("mask_mode", None)
            if mask_mode:
                s["mask_mode"] = mask_mode
    return {**base, "name": name, "stages": stages}


def to_markdown(result: dict) -> str:
    lines = ["# 2:4 on the zoo teacher: quality after the same recovery", "",
             f"`{result['command']}` on {result['machine']['cpu']}, {result['machine']['platform']}; torch "
             f"{result['packages']['torch']}. Base recipe `{result['recipe']}`; {result['seconds'] / 60:.1f} min in all. "
             f"Recovery {result['distill_steps']} steps for every variant; {result['eval']['num_samples']} samples, "
             f"{result['eval']['steps']} {result['eval']['scheduler'].upper()} steps, the same noise for every model.", "",
             "| variant | model | 2:4 layers | share of weights under a mask | FID | PSNR vs teacher (dB) | SSIM vs teacher |",
             "|---|---|---|---|---|---|---|"]
    for name, v in result["variants"].items():
        for role in ("teacher", "pruned", "student"):
            if role == "teacher" and name != next(iter(result["variants"])):
                continue
            q = v["quality"].get(role, {})
            sp = v.get("sparsity") or {}
            cells = [f"{q[m]:.3f}" if m in q else "–" for m in METRICS]
            layers = str(sp.get("layers", 0)) if role != "teacher" else "–"
            share = f"{sp['share_of_params']:.1%}" if sp and role != "teacher" else "–"
            label = name if role != "teacher" else "(dense teacher)"
            lines.append(f"| {label} | {role} | {layers} | {share} | " + " | ".join(cells) + " |")
    lines += ["", "`pruned` is each variant's student before recovery (for the 2:4 variants: pruned and masked).", ""]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    base = yaml.safe_load(RECIPE.read_text())
    variants = {"pruned 50%": None, "pruned 50% + 2:4 (fixed masks)": "fixed", "pruned 50% + 2:4 (SR-STE)": "sr-ste"}
    started = time.perf_counter()
    result: dict = {"command": command_line("benchmarks/sparse_quality.py"), "recipe": str(RECIPE.relative_to(HERE.parent)),
                    "machine": {"cpu": cpu_name(), "platform": platform.platform(), "python": sys.version.split()[0]},
                    "packages": {k: package_versions().get(k) for k in ("torch", "diffusers", "torch-pruning")},
                    "variants": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, mode) in enumerate(variants.items()):
            path = Path(tmp) / f"variant{i}.yaml"
            path.write_text(yaml.safe_dump(variant(base, f"variant{i}", mode), sort_keys=False))
            t = time.perf_counter()
            report = build(load_recipe(path), path, Path(tmp) / f"art{i}", Console(stderr=True))
            result["variants"][name] = {"mask_mode": mode, "seconds": round(time.perf_counter() - t, 1),
                                        "quality": {r: report[r]["quality"] for r in ("teacher", "pruned", "student") if r in report},
                                        "macs_ratio": report.get("macs_ratio"), "sparsity": report.get("sparsity")}
            print(f"{name}: " + json.dumps(result["variants"][name]["quality"].get("student")), file=sys.stderr)
    result["seconds"] = round(time.perf_counter() - started, 1)
    distill = next(s for s in base["stages"] if s["stage"] == "distill")
    evaluation = next(s for s in base["stages"] if s["stage"] == "eval")
    result["distill_steps"] = distill["steps"]
    result["eval"] = {"num_samples": evaluation["num_samples"], "steps": evaluation["steps"],
                      "scheduler": evaluation.get("scheduler", "ddim")}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sparse_quality.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "sparse_quality.md").write_text(to_markdown(result))
    print(to_markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
