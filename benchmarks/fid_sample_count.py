"""Where the zoo teacher's FID settles: `python benchmarks/fid_sample_count.py`.

FID is biased upward at small sample counts and moves with the noise the samples are drawn from, so a
difference between two recovered students means something only at a count where the teacher's own FID
has stopped moving. This samples the digits teacher from several noise seeds, exactly as the eval
stage does (DDIM, 25 steps, seed = the build's seed), and scores nested prefixes of each seed's samples
(the first 256, 512, ... of the same images) against the eval stage's fixed reference half of the real
digits: FID, and KID (x1e3), which is unbiased at any count. The real-image floor is scored the same
way up to the size of the other half. Writes ``benchmarks/results/<name>.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import torch

from deploykit.artifact import package_versions
from deploykit.bench.machine import command_line, cpu_name
from deploykit.eval import extract_features, feature_stats, frechet_distance, kernel_inception_distance, split_reference
from deploykit.models.teacher import load_teacher
from deploykit.runtime import TorchBackend, make_scheduler, sample_batched
from deploykit.stages.data import FEATURES, feature_extractor
from deploykit.zoo import get_entry
from deploykit.zoo.data import load_digits_images

HERE = Path(__file__).resolve().parent


def _mean_sd(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
            "values": values}


def settled_count(rows: list[dict], tolerance: float) -> int | None:
    """The smallest count from which on the seeds' FID spread (sd) and the drift of the mean to the largest
    count both stay within ``tolerance`` of that largest count's mean FID."""
    final = rows[-1]["fid"]["mean"]
    ok = [abs(r["fid"]["mean"] - final) <= tolerance * final and r["fid"]["sd"] <= tolerance * final for r in rows]
    for i in range(len(rows)):
        if all(ok[i:]):
            return rows[i]["samples"]
    return None


def to_markdown(result: dict) -> str:
    s = result["settings"]
    lines = [f"# Where the {s['teacher']} teacher's FID settles", "",
             f"`{result['command']}` on {result['date']}, {result['machine']['cpu']}, {result['machine']['platform']}; "
             f"torch {result['packages']['torch']}; {result['seconds'] / 60:.1f} min. The teacher sampled from seeds "
             f"{', '.join(map(str, s['seeds']))} ({s['steps']} DDIM steps, noise drawn as the eval stage draws it), "
             f"each count a prefix of the same seed's samples; FID / KID (x1e3) on the zoo classifier's 128-d features "
             f"against the eval stage's reference half of the real digits ({result['reference_images']} images). "
             f"Floor: real digits from the other half ({result['floor_images']}), scored the same way.", "",
             "| samples | teacher FID (mean ± sd over seeds) | per seed | teacher KID | real-image floor FID | floor KID |",
             "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        floor = r.get("floor")
        lines.append(f"| {r['samples']} | {r['fid']['mean']:.2f} ± {r['fid']['sd']:.2f} | "
                     + " / ".join(f"{v:.2f}" for v in r["fid"]["values"])
                     + f" | {r['kid']['mean']:.2f} ± {r['kid']['sd']:.2f} | "
                     + (f"{floor['fid']:.2f} | {floor['kid']:.2f} |" if floor else "– | – |"))
    settled = result["settled_samples"]
    lines += ["", f"Settled (seed spread and drift to the largest count both within {s['tolerance']:.0%} of the "
                  f"largest count's mean): " + (f"**{settled} samples**." if settled else "not within the counts measured."),
              ""]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="zoo:digits", choices=["zoo:digits"])
    parser.add_argument("--counts", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--tolerance", type=float, default=0.05)
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--name", default="fid_sample_count")
    args = parser.parse_args()
    counts = sorted(args.counts)

    started = time.perf_counter()
    teacher = load_teacher(args.teacher)
    backend = TorchBackend(teacher.model.eval())
    extractor = feature_extractor(get_entry(args.teacher.removeprefix("zoo:")).folder)
    if extractor is None:
        print(f"error: {args.teacher} ships no {FEATURES}", file=sys.stderr)
        return 2
    reference_images, floor_images = split_reference(load_digits_images(teacher.sample_shape[-1])[0])
    real_features = extract_features(extractor, reference_images)
    real_stats = feature_stats(real_features)

    def score(features: torch.Tensor, seed: int) -> tuple[float, float]:
        return (frechet_distance(*feature_stats(features), *real_stats),
                kernel_inception_distance(real_features, features, seed=seed).mean)

    per_seed = {}
    for seed in args.seeds:
        # the eval stage's draw: one generator seeded with the build seed, all samples at once
        noise = torch.randn(counts[-1], *teacher.sample_shape, generator=torch.Generator().manual_seed(seed))
        with torch.inference_mode():
            images = sample_batched(backend, make_scheduler("ddim", teacher.scheduler_config), noise, args.steps,
                                    args.batch_size)
        features = extract_features(extractor, images)
        per_seed[seed] = {n: score(features[:n], seed) for n in counts}
        print(f"seed {seed}: " + ", ".join(f"{n}: FID {f:.2f}" for n, (f, _) in per_seed[seed].items()), flush=True)
    floor_features = extract_features(extractor, floor_images)
    rows = []
    for n in counts:
        row = {"samples": n, "fid": _mean_sd([per_seed[s][n][0] for s in args.seeds]),
               "kid": _mean_sd([per_seed[s][n][1] for s in args.seeds])}
        if n <= len(floor_images):
            fid_floor, kid_floor = score(floor_features[:n], 0)
            row["floor"] = {"fid": fid_floor, "kid": kid_floor}
        rows.append(row)
    result = {"command": command_line("benchmarks/fid_sample_count.py"), "date": date.today().isoformat(),
              "machine": {"cpu": cpu_name(), "platform": platform.platform(), "python": sys.version.split()[0]},
              "packages": {k: package_versions().get(k) for k in ("torch", "diffusers")},
              "settings": {k: v for k, v in vars(args).items() if k != "out"},
              "reference_images": len(reference_images), "floor_images": len(floor_images), "rows": rows,
              "settled_samples": settled_count(rows, args.tolerance),
              "seconds": round(time.perf_counter() - started, 1)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / f"{args.name}.md").write_text(to_markdown(result))
    print(to_markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
