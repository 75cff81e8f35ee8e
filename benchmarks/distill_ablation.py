"""DaKD ablation on the zoo teacher: `python benchmarks/distill_ablation.py`.

The teacher pruned once to half its MACs (magnitude criterion), then recovered with the same steps,
batch, learning rate and seed under a growing loss, one term added per variant (the last takes one away):

1. ``denoise``: the denoising loss alone (Diff-Pruning's recovery)
2. ``+ output KD``
3. ``+ feature KD`` (block outputs, normalised by the teacher's norm; LAPTOP-Diff)
4. ``+ attention KD``
5. ``+ distribution KD`` (KL of the spatial softmaxes of the noise, temperature tau; NiCI)
6. ``+ adversarial``: full DaKD
7. ``no-denoise``: full DaKD without the denoising term (what the text-to-image recipes ship)

Each variant is evaluated the same way: FID on the zoo classifier's features against the real
digits, PSNR / SSIM against the teacher's samples from the same noise. Every build writes into one
artifact folder, so the teacher and prune stages are computed once and taken from the stage cache
by every other variant; only distill and eval run again. Writes
`benchmarks/results/<name>.json` and `.md` with the machine and the exact command.
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
METRICS = ("fid", "kid", "psnr_vs_teacher", "ssim_vs_teacher")  # KID x1e3: unbiased at small sample counts
# variant -> the weights it adds to the one before it
VARIANTS = {
    "denoise": {"denoise_weight": 1.0, "output_kd_weight": 0.0},
    "+output-kd": {"output_kd_weight": 1.0},
    "+feature-kd": {"feature_kd_weight": None},       # None: the value of the matching command-line option
    "+attention-kd": {"attention_kd_weight": None},
    "+distribution-kd": {"distribution_kd_weight": None},
    "+adversarial": {"adversarial_weight": None},
    "no-denoise": {"denoise_weight": 0.0},
}


def variant_weights(args) -> dict[str, dict]:
    """Each variant's complete loss weights: the variants before it, plus its own term."""
    options = {"feature_kd_weight": args.feature_kd, "attention_kd_weight": args.attention_kd,
               "distribution_kd_weight": args.distribution_kd, "adversarial_weight": args.adversarial}
    weights, out = {}, {}
    for name, added in VARIANTS.items():
        weights = {**weights, **{k: options[k] if v is None else v for k, v in added.items()}}
        out[name] = dict(weights)
    return out


def recipe_for(args, name: str, weights: dict) -> dict:
    distill = {"stage": "distill", "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
               "checkpoint_every": max(50, args.steps // 10), **weights}
    if weights.get("distribution_kd_weight"):
        distill["distribution_temperature"] = args.temperature
    if weights.get("adversarial_weight"):
        distill["adversarial_warmup"] = min(args.adversarial_warmup, args.steps - 1)
    return {
        "name": f"ablation-{name.strip('+-')}",
        "teacher": args.teacher,
        "seed": args.seed,
        "stages": [
            {"stage": "prune", "criterion": "magnitude", "macs_target": args.macs_target, "round_to": 8},
            distill,
            {"stage": "eval", "num_samples": args.samples, "steps": args.eval_steps},
        ],
    }


def distill_record(artifact: Path) -> dict:
    """distill.json of the build the artifact's manifest describes (the one just finished)."""
    manifest = json.loads((artifact / "manifest.json").read_text())
    folder = next(s["dir"] for s in manifest["stages"] if s["name"] == "distill")
    return json.loads((artifact / "stages" / folder / "distill.json").read_text())


def to_markdown(result: dict) -> str:
    s = result["settings"]
    lines = [f"# DaKD ablation on {s['teacher']}", "",
             f"`{result['command']}` on {result['machine']['cpu']}, {result['machine']['platform']}; torch "
             f"{result['packages']['torch']}; {result['seconds'] / 60:.1f} min in all. Pruned once to "
             f"{result['macs_ratio']:.3f} of the MACs (target {s['macs_target']}, magnitude); every variant recovers for "
             f"{s['steps']} steps at batch {s['batch_size']}, lr {s['lr']}, seed {s['seed']}; {s['samples']} samples, "
             f"{s['eval_steps']} DDIM steps, the same noise for every model.", "",
             "| variant | loss weights | FID | KID | PSNR vs teacher (dB) | SSIM vs teacher | distill time (s) |",
             "|---|---|---|---|---|---|---|"]
    first = next(iter(result["variants"].values()))
    for role in ("teacher", "pruned"):
        q = first["quality"].get(role, {})
        lines.append(f"| ({role}) | – | " + " | ".join(f"{q[m]:.3f}" if m in q else "–" for m in METRICS) + " | – |")
    for name, v in result["variants"].items():
        q = v["quality"].get("student", {})
        weights = ", ".join(f"{k.removesuffix('_weight')} {w:g}" for k, w in v["weights"].items() if w)
        lines.append(f"| {name} | {weights} | " + " | ".join(f"{q[m]:.3f}" if m in q else "–" for m in METRICS)
                     + f" | {v['distill_seconds']:.0f} |")
    lines += ["", f"Distribution KD at temperature {s['temperature']}; the adversarial term starts after "
                  f"{min(s['adversarial_warmup'], s['steps'] - 1)} steps. One seed: differences within a few FID points "
                  "are within what another seed could move.", ""]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="zoo:digits")
    parser.add_argument("--macs-target", type=float, default=0.5)
    parser.add_argument("--steps", type=int, default=1000, help="recovery steps, the same for every variant")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--samples", type=int, default=512, help="samples for FID / PSNR / SSIM")
    parser.add_argument("--eval-steps", type=int, default=25)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--feature-kd", type=float, default=0.1, help="feature_kd_weight where it is on")
    parser.add_argument("--attention-kd", type=float, default=0.1, help="attention_kd_weight where it is on")
    parser.add_argument("--distribution-kd", type=float, default=1.0, help="distribution_kd_weight where it is on")
    parser.add_argument("--temperature", type=float, default=1.0, help="distribution_temperature")
    parser.add_argument("--adversarial", type=float, default=0.01, help="adversarial_weight where it is on")
    parser.add_argument("--adversarial-warmup", type=int, default=250)
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--name", default="distill_ablation")
    args = parser.parse_args()

    console = Console(stderr=True)
    weights = variant_weights(args)
    started = time.perf_counter()
    result: dict = {"command": command_line("benchmarks/distill_ablation.py"),
                    "machine": {"cpu": cpu_name(), "platform": platform.platform(), "python": sys.version.split()[0]},
                    "packages": {k: package_versions().get(k) for k in ("torch", "diffusers", "accelerate", "torch-pruning")},
                    "settings": {k: v for k, v in vars(args).items() if k != "out"}, "variants": {}}
    with tempfile.TemporaryDirectory() as tmp:
        artifact = Path(tmp) / "artifact"  # one folder: teacher and prune are cached after the first variant
        for name in args.variants:
            path = Path(tmp) / f"{name.strip('+-')}.yaml"
            path.write_text(yaml.safe_dump(recipe_for(args, name, weights[name]), sort_keys=False))
            console.rule(f"{name}: " + ", ".join(f"{k} {v:g}" for k, v in weights[name].items() if v))
            t = time.perf_counter()
            report = build(load_recipe(path), path, artifact, console)
            distill = distill_record(artifact)
            result["variants"][name] = {
                "weights": weights[name], "seconds": round(time.perf_counter() - t, 1),
                "distill_seconds": distill["seconds"], "final_terms": report["distill"]["final_terms"],
                "quality": {r: report[r]["quality"] for r in ("teacher", "pruned", "student") if r in report}}
            result["macs_ratio"] = report["macs_ratio"]
            console.print(f"{name}: " + json.dumps(result["variants"][name]["quality"]["student"]))
    result["seconds"] = round(time.perf_counter() - started, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / f"{args.name}.md").write_text(to_markdown(result))
    print(to_markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
