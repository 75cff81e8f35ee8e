"""The DaKD ablation over seeds: mean, spread and each term's gain over output KD, from committed runs.

    python benchmarks/distill_ablation_seeds.py benchmarks/results/distill_ablation_512_seed{0,1,2}.json

Reads the JSON that ``benchmarks/distill_ablation.py`` wrote for each seed (same settings but the seed,
checked) and writes ``distill_ablation_512_seeds.{json,md}``: per variant the mean and standard deviation
of FID, KID and PSNR / SSIM against the teacher, and per seed the change each variant makes against
``+output-kd`` of the same seed, so a term's effect is read beside what a change of seed does.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
METRICS = ("fid", "kid", "psnr_vs_teacher", "ssim_vs_teacher")
BASE = "+output-kd"
FULL, NO_DENOISE = "+adversarial", "no-denoise"


def _mean_sd(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
            "values": values}


def summarize(runs: list[dict]) -> dict:
    settings = [{k: v for k, v in r["settings"].items() if k not in ("seed", "name")} for r in runs]
    if any(s != settings[0] for s in settings[1:]):
        raise ValueError("the runs differ in more than the seed")
    variants = runs[0]["settings"]["variants"]
    seeds = [r["settings"]["seed"] for r in runs]
    table = {"teacher": {m: _mean_sd([r["variants"][variants[0]]["quality"]["teacher"][m] for r in runs])
                         for m in ("fid", "kid")}}
    for v in variants:
        table[v] = {m: _mean_sd([r["variants"][v]["quality"]["student"][m] for r in runs]) for m in METRICS}
    gains = {}
    if BASE in variants:
        for v in variants:
            if v == BASE:
                continue
            gains[v] = {m: [r["variants"][v]["quality"]["student"][m] - r["variants"][BASE]["quality"]["student"][m]
                            for r in runs] for m in METRICS}
    # the last variant takes the denoising term out of full DaKD: read it against full DaKD, not output KD
    without = {}
    if {FULL, NO_DENOISE} <= set(variants):
        without = {m: [r["variants"][NO_DENOISE]["quality"]["student"][m] - r["variants"][FULL]["quality"]["student"][m]
                       for r in runs] for m in METRICS}
    return {"seeds": seeds, "settings": settings[0], "commands": [r["command"] for r in runs],
            "machines": [r["machine"] for r in runs], "table": table, "against_output_kd": gains,
            "without_denoise": without}


def markdown(summary: dict) -> str:
    s, seeds = summary["settings"], summary["seeds"]
    lines = [f"# DaKD ablation on {s['teacher']} over {len(seeds)} seeds ({s['samples']} samples)", "",
             "`python benchmarks/distill_ablation_seeds.py` over the runs of "
             + ", ".join(f"`{c}`" for c in summary["commands"])
             + f" ({summary['machines'][0].get('cpu')}). Each seed prunes the teacher, recovers it with each variant for "
             f"{s['steps']} steps at batch {s['batch_size']} and samples {s['samples']} images from its own noise "
             f"({s['eval_steps']} DDIM steps); KID x1e3. Mean ± standard deviation over seeds {', '.join(map(str, seeds))}:", "",
             "| variant | FID | KID | PSNR vs teacher (dB) | SSIM vs teacher |", "|---|---|---|---|---|"]
    t = summary["table"]
    lines.append(f"| (teacher) | {t['teacher']['fid']['mean']:.2f} ± {t['teacher']['fid']['sd']:.2f} "
                 f"| {t['teacher']['kid']['mean']:.2f} ± {t['teacher']['kid']['sd']:.2f} | – | – |")
    for v in s["variants"]:
        r = t[v]
        lines.append(f"| {v} | {r['fid']['mean']:.2f} ± {r['fid']['sd']:.2f} | {r['kid']['mean']:.2f} ± {r['kid']['sd']:.2f} "
                     f"| {r['psnr_vs_teacher']['mean']:.2f} ± {r['psnr_vs_teacher']['sd']:.2f} "
                     f"| {r['ssim_vs_teacher']['mean']:.3f} ± {r['ssim_vs_teacher']['sd']:.3f} |")
    if summary["against_output_kd"]:
        lines += ["", f"Each variant against `{BASE}` of the same seed (seeds {', '.join(map(str, seeds))}; "
                  "negative FID / KID and positive PSNR / SSIM are better):", "",
                  "| variant | ΔFID | ΔKID | ΔPSNR dB | ΔSSIM |", "|---|---|---|---|---|"]
        for v, g in summary["against_output_kd"].items():
            cells = [" / ".join(f"{x:+.2f}" for x in g[m]) for m in ("fid", "kid", "psnr_vs_teacher")]
            cells.append(" / ".join(f"{x:+.3f}" for x in g["ssim_vs_teacher"]))
            lines.append(f"| {v} | " + " | ".join(cells) + " |")
    if summary.get("without_denoise"):
        g = summary["without_denoise"]
        lines += ["", f"`{NO_DENOISE}` against full DaKD (`{FULL}`) of the same seed: "
                  + "; ".join(f"Δ{label} " + " / ".join(f"{x:+.3f}" for x in g[m])
                              for label, m in (("FID", "fid"), ("KID", "kid"), ("PSNR dB", "psnr_vs_teacher"),
                                               ("SSIM", "ssim_vs_teacher"))) + "."]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, nargs="+", help="distill_ablation.py JSON files, one per seed")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--name", default="distill_ablation_512_seeds")
    args = parser.parse_args()
    try:
        summary = summarize([json.loads(p.read_text()) for p in args.runs])
    except (OSError, KeyError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(summary, indent=2) + "\n")
    text = markdown(summary)
    (args.out / f"{args.name}.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
