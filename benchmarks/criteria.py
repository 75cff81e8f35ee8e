"""Importance criteria compared on one teacher and one budget: `python benchmarks/criteria.py`.

For each MACs target and criterion (and seed), one `deploykit build` of prune -> distill -> eval on
the zoo teacher: FID before recovery (the pruned model) and after the same recovery budget, PSNR /
SSIM to the teacher, and the time the criterion's own gradient loop or calibration took. Writes
`benchmarks/results/criteria.json` and `.md` with the machine and the exact command.

The papers' differences are small (5.29 vs 5.48 vs 5.62 FID on CIFAR-10), so use several seeds
where the budget allows; the table reports mean and spread over seeds.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import yaml
from rich.console import Console

from deploykit.bench.machine import cpu_name
from deploykit.recipe import load_recipe
from deploykit.runner import build

HERE = Path(__file__).resolve().parent
CRITERIA = ["random", "magnitude", "taylor", "diff-pruning", "nici", "cap", "block-removal"]


def recipe_for(args, criterion: str, target: float, seed: int) -> dict:
    return {
        "name": f"criteria-{criterion}-{int(target * 100)}-s{seed}",
        "teacher": args.teacher,
        "seed": seed,
        "stages": [
            {"stage": "prune", "criterion": criterion, "macs_target": target, "round_to": 8,
             "batch_size": args.prune_batch, "gradient_batches": 4},
            {"stage": "distill", "steps": args.recovery_steps, "batch_size": 64},
            {"stage": "eval", "num_samples": args.samples, "steps": args.eval_steps},
        ],
    }


def spread(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}


# settings a resumed run must share with the rows it keeps
_COMPARABLE = ("teacher", "recovery_steps", "samples", "eval_steps", "prune_batch")


def previous_run(args) -> dict:
    """An earlier run of the same comparison (``--resume``): same settings, any criteria / targets / seeds."""
    path = args.out / f"{args.name}.json"
    if not path.is_file():
        return {"rows": [], "commands": []}
    old = json.loads(path.read_text())
    differing = [k for k in _COMPARABLE if old["settings"].get(k) != getattr(args, k)]
    if differing:
        raise SystemExit(f"--resume: {path} was run with other settings ({', '.join(differing)}); use another --name")
    return {"rows": old["rows"], "commands": old.get("commands", [old["command"]])}


def write_results(args, rows: list[dict], commands: list[str]) -> list[str]:
    """The table over every row the results hold (a resumed run's rows included), and the commands that made them."""
    for r in rows:  # the sampling noise is the seed's: the teacher's FID on the same noise is each row's floor
        r["student_fid_gap"] = r["student_fid"] - r["teacher_fid"]
    table = []
    for target in sorted({r["macs_target"] for r in rows}, reverse=True):
        for criterion in CRITERIA:
            cell = [r for r in rows if r["criterion"] == criterion and r["macs_target"] == target]
            if cell:
                table.append({"criterion": criterion, "macs_target": target,
                              **{k: spread([r[k] for r in cell]) for k in
                                 ("macs_ratio", "pruned_fid", "student_fid", "student_fid_gap", "student_psnr",
                                  "criterion_seconds")}})
    result = {"command": " && ".join(commands), "commands": commands, "machine": {"cpu": cpu_name(), "platform": platform.platform()},
              "settings": {k: v for k, v in vars(args).items() if k != "resume"} | {"out": str(args.out)},
              "rows": rows, "table": table}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    seeds = sorted({r["seed"] for r in rows})
    lines = [f"# Importance criteria on {args.teacher}", "",
             "`" + "`, then `".join(commands) + f"` on {result['machine']['cpu']} ({result['machine']['platform']}). "
             f"Recovery {args.recovery_steps} steps for every criterion; FID on {args.samples} samples, "
             f"{args.eval_steps} DDIM steps; seeds {seeds}, mean ± standard deviation over seeds. The seed also "
             "draws the evaluation noise, and at this sample count the teacher's own FID moves with it (teacher FID "
             + ", ".join(f"{t:.2f} at seed {s}" for s, t in sorted({r["seed"]: r["teacher_fid"] for r in rows}.items()))
             + "): compare criteria by FID recovered − teacher (same noise) and PSNR.", "",
             "| MACs target | criterion | seeds | MACs ratio | FID pruned | FID recovered | FID recovered − teacher | "
             "PSNR vs teacher (dB) | criterion time (s) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in table:
        def fmt(k, d=2):
            s = row[k]
            return f"{s['mean']:.{d}f}" + (f" ± {s['std']:.{d}f}" if s["n"] > 1 else "")
        lines.append(f"| {row['macs_target']:.0%} | {row['criterion']} | {row['student_fid']['n']} | {fmt('macs_ratio', 3)} | "
                     f"{fmt('pruned_fid')} | {fmt('student_fid')} | {fmt('student_fid_gap')} | {fmt('student_psnr')} | "
                     f"{fmt('criterion_seconds', 1)} |")
    (args.out / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="zoo:digits")
    parser.add_argument("--targets", type=float, nargs="+", default=[0.7, 0.5, 0.3])
    parser.add_argument("--criteria", nargs="+", default=CRITERIA, choices=CRITERIA)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--recovery-steps", type=int, default=200)
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--eval-steps", type=int, default=25)
    parser.add_argument("--prune-batch", type=int, default=16)
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--name", default="criteria")
    parser.add_argument("--resume", action="store_true",
                        help="keep the rows an earlier run with the same settings wrote under --name; build only the missing ones")
    args = parser.parse_args()

    console = Console(stderr=True)
    previous = previous_run(args) if args.resume else {"rows": [], "commands": []}
    rows = previous["rows"]
    commands = previous["commands"]
    this_command = " ".join(["python benchmarks/criteria.py", *sys.argv[1:]])
    done = {(r["criterion"], r["macs_target"], r["seed"]) for r in rows}
    with tempfile.TemporaryDirectory() as tmp:
        # seeds outermost: an interrupted run still leaves whole tables for the seeds it finished
        for seed in args.seeds:
            for target in args.targets:
                for criterion in args.criteria:
                    if (criterion, target, seed) in done:
                        continue
                    path = Path(tmp) / f"{criterion}-{target}-{seed}.yaml"
                    path.write_text(yaml.safe_dump(recipe_for(args, criterion, target, seed), sort_keys=False))
                    console.rule(f"{criterion} at {target:.0%} MACs, seed {seed}")
                    started = time.perf_counter()
                    report = build(load_recipe(path), path, Path(tmp) / path.stem, console)
                    prune = json.loads(next((Path(tmp) / path.stem / "stages").glob("*-prune-*/prune.json")).read_text())
                    if this_command not in commands:  # a command that built no row made none of the results
                        commands.append(this_command)
                    rows.append({
                        "criterion": criterion, "macs_target": target, "seed": seed,
                        "macs_ratio": report["macs_ratio"], "params_ratio": report["params_ratio"],
                        "criterion_seconds": prune["criterion_seconds"],
                        "teacher_fid": report["teacher"]["quality"].get("fid"),
                        "pruned_fid": report["pruned"]["quality"].get("fid"),
                        "student_fid": report["student"]["quality"].get("fid"),
                        "student_fid_gap": report["student"]["quality"].get("fid") - report["teacher"]["quality"].get("fid"),
                        "student_psnr": report["student"]["quality"]["psnr_vs_teacher"],
                        "student_ssim": report["student"]["quality"]["ssim_vs_teacher"],
                        "build_seconds": time.perf_counter() - started,
                    })
                    write_results(args, rows, commands)  # after every build: a long run can be resumed
    console.print("\n".join(write_results(args, rows, commands)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
