"""INT8 for OpenVINO: the quantize stage's QDQ graph against NNCF's post-training quantization.

`python benchmarks/openvino_nncf.py ARTIFACT` takes a pixel-model artifact built with a quantize
stage (`recipes/digits_int8_cpu.yaml`: real weights, so quality can be measured), re-records the
quantize stage's calibration batches exactly (the teacher's own DDIM trajectories from the same
seeded noise), quantizes the student's fp32 ONNX UNet with `nncf.quantize` on those batches with
the same exclusions (:data:`deploykit.quantize.exclude.DEFAULT_EXCLUDE`: time embeddings,
conv_in / conv_out, shortcuts, norm_out), and compares it with the QDQ graph, both in OpenVINO:

- speed: fp32 student, QDQ student and NNCF student round-robin in one window;
- quality: output SNR against the fp32 student on held-out calibration batches, and FID (zoo
  classifier features, the eval stage's reference split) and PSNR against the fp32 student's samples
  from the same noise (DDIM).

NNCF is kept as a second INT8 path only if it is faster at equal or better quality; the verdict is
written beside the figures in `benchmarks/results/openvino_nncf.{json,md}`. Needs `pip install 'deploykit[nncf]'`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from deploykit.artifact import package_versions
from deploykit.bench import measure_rounds
from deploykit.bench.machine import command_line, device_info
from deploykit.eval import extract_features, feature_stats, frechet_distance, psnr_ssim, split_reference
from deploykit.models import load_model
from deploykit.models.inputs import unet_input_names
from deploykit.quantize.calibration import RecordingDenoiser
from deploykit.quantize.exclude import DEFAULT_EXCLUDE
from deploykit.runtime import TorchBackend, cpu_threads, make_scheduler, sample_batched
from deploykit.runtime.openvino import OpenVINOBackend
from deploykit.stages.data import feature_extractor, teacher_meta, training_images
from deploykit.stages.quantize import CALIBRATION_SEED_OFFSET

HERE = Path(__file__).resolve().parent


def stage(artifact: Path, name: str) -> Path:
    return sorted(artifact.glob(f"stages/*-{name}-*"))[-1]


def calibration_batches(artifact: Path, meta: dict) -> tuple[list[dict], dict]:
    """The quantize stage's calibration batches, recorded again the way it records them (same seed, same noise)."""
    manifest = json.loads((artifact / "manifest.json").read_text())
    cfg = next(s for s in manifest["recipe"]["stages"] if s["stage"] == "quantize")
    seed = manifest["recipe"].get("seed", 0)
    samples, steps = cfg.get("calibration_samples", 64), cfg.get("calibration_steps", 10)
    teacher = load_model(stage(artifact, "teacher") / "model")
    noise = torch.randn(samples, *meta["sample_shape"], generator=torch.Generator().manual_seed(seed + CALIBRATION_SEED_OFFSET))
    recorder = RecordingDenoiser(TorchBackend(teacher), unet_input_names(teacher))
    sample_batched(recorder, make_scheduler(cfg.get("scheduler", "ddim"), meta["scheduler_config"]), noise, steps, samples)
    return recorder.batches, {"samples": samples, "steps": steps, "seed": seed + CALIBRATION_SEED_OFFSET}


def ignored_patterns(exclude=DEFAULT_EXCLUDE) -> list[str]:
    """The module-name globs as regexes on OpenVINO node names, which keep the ONNX scopes (``/unet/conv_in/Conv``)."""
    out = []
    for p in exclude:
        core = re.escape(p.strip("*")).replace(r"\*", ".*")
        out.append(f".*{core}.*" if p.startswith("*") else f"(^|.*/){core}/.*")
    return out


def quantize_nncf(fp32: Path, dst: Path, batches: list[dict]) -> dict:
    import nncf
    import openvino as ov

    model = ov.Core().read_model(str(fp32))
    names = [p.get_any_name() for p in model.inputs]
    quantized = nncf.quantize(model, nncf.Dataset(batches, lambda b: {n: b[n] for n in names}), subset_size=len(batches),
                              ignored_scope=nncf.IgnoredScope(patterns=ignored_patterns(), validate=False))
    ov.save_model(quantized, str(dst))
    return {"nncf": nncf.__version__, "calibration_batches": len(batches), "ignored_patterns": ignored_patterns()}


def snr_db(reference, other, batches: list[dict]) -> float:
    signal = noise = 0.0
    for b in batches:
        a = reference.run_numpy(*b.values()).astype(np.float64)
        c = other.run_numpy(*b.values()).astype(np.float64)
        signal, noise = signal + float((a ** 2).sum()), noise + float(((a - c) ** 2).sum())
    return float(10 * np.log10(signal / noise))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    torch.set_num_threads(cpu_threads())
    teacher_dir = stage(args.artifact, "teacher")
    meta = teacher_meta(teacher_dir)
    batches, calibration = calibration_batches(args.artifact, meta)
    held_out = batches[1::max(1, len(batches) // 8)][:8]
    fp32 = stage(args.artifact, "export") / "student" / "unet" / "model.onnx"
    qdq = stage(args.artifact, "quantize") / "student" / "unet" / "model.onnx"
    with tempfile.TemporaryDirectory() as tmp:
        nncf_path = Path(tmp) / "student_nncf.xml"
        nncf_info = quantize_nncf(fp32, nncf_path, batches)
        models = {"fp32": OpenVINOBackend(fp32), "qdq-int8": OpenVINOBackend(qdq), "nncf-int8": OpenVINOBackend(nncf_path)}
        load_before = os.getloadavg()
        inputs = list(batches[len(batches) // 2].values())
        rounds = measure_rounds({k: (lambda m=m: m.run_numpy(*inputs)) for k, m in models.items()}, args.warmup, args.runs)
        load_after = os.getloadavg()
        noise = torch.randn(args.samples, *meta["sample_shape"], generator=torch.Generator().manual_seed(0))
        scheduler = make_scheduler("ddim", meta["scheduler_config"])
        images = {k: sample_batched(m, scheduler, noise, args.steps, 64) for k, m in models.items()}
        snr = {k: snr_db(models["fp32"], m, held_out) for k, m in models.items() if k != "fp32"}
    extractor = feature_extractor(teacher_dir)
    reference, _ = split_reference(training_images(meta))
    ref_stats = feature_stats(extract_features(extractor, reference))
    def against_fp32(x):
        return {f"{m.removesuffix('_vs_teacher')}_vs_fp32_student": v for m, v in psnr_ssim(x, images["fp32"]).items()}

    quality = {k: {"fid": float(frechet_distance(*feature_stats(extract_features(extractor, x)), *ref_stats)),
                   **(against_fp32(x) if k != "fp32" else {}),
                   **({"output_snr_db_vs_fp32": snr[k]} if k in snr else {})} for k, x in images.items()}
    latency = {k: rounds.latency(k).__dict__ for k in models}
    faster = latency["nncf-int8"]["p50_ms"] < latency["qdq-int8"]["p50_ms"]
    as_good = quality["nncf-int8"]["fid"] <= quality["qdq-int8"]["fid"] and \
        quality["nncf-int8"]["psnr_vs_fp32_student"] >= quality["qdq-int8"]["psnr_vs_fp32_student"]
    verdict = ("NNCF wins: faster at equal or better quality" if faster and as_good else
               "NNCF is left out: " + ("not faster" if not faster else "faster, but at lower quality")
               + " than the quantize stage's QDQ graph in OpenVINO")
    result = {"command": command_line("benchmarks/openvino_nncf.py"),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "artifact_recipe": json.loads((args.artifact / "report.json").read_text()).get("recipe"),
              "calibration": calibration, "nncf": nncf_info, "shape": list(inputs[0].shape),
              "machine": {**device_info(), "platform": platform.platform()},
              "packages": {k: package_versions().get(k) for k in ("openvino", "nncf", "onnxruntime")},
              "load_average": {"before": list(load_before), "after": list(load_after)},
              "latency": latency, "speedup_vs_fp32": {k: latency["fp32"]["p50_ms"] / v["p50_ms"] for k, v in latency.items()},
              "speedup_pair_median_vs_fp32": {k: rounds.ratio_median("fp32", k) for k in models},
              "quality": quality, "samples": args.samples, "steps": args.steps, "verdict": verdict}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "openvino_nncf.json").write_text(json.dumps(result, indent=2) + "\n")
    m = result["machine"]
    lines = ["# OpenVINO INT8: the quantize stage's QDQ graph against NNCF post-training quantization", "",
             f"Student UNet of `{result['artifact_recipe']}`, input {'x'.join(map(str, result['shape']))}, {m['cpu']}, "
             f"{m['threads']} threads, openvino {result['packages']['openvino']}, nncf {result['packages']['nncf']}; "
             f"{result['date'][:10]}. Both calibrated on the same {calibration['samples']} x {calibration['steps']} "
             f"teacher trajectories ({len(batches)} batches), same exclusions. Latency: round-robin in one window, "
             f"{args.runs} rounds; load average (1 min) {load_before[0]:.2f} before, {load_after[0]:.2f} after. Quality: "
             f"{args.samples} samples, {args.steps} DDIM steps, the same noise; FID on the zoo classifier's features "
             "against the eval stage's reference split; PSNR / SSIM against the fp32 student's samples.", "",
             "| student UNet in OpenVINO | p50 ms | vs fp32 | output SNR vs fp32 | FID | PSNR vs fp32 student | SSIM |",
             "|---|---|---|---|---|---|---|"]
    for k in models:
        q = quality[k]
        lines.append(f"| {k} | {latency[k]['p50_ms']:.1f} | {result['speedup_vs_fp32'][k]:.2f}x | "
                     f"{q.get('output_snr_db_vs_fp32', float('inf')):.1f} dB | {q['fid']:.2f} | "
                     f"{q.get('psnr_vs_fp32_student', float('inf')):.2f} dB | "
                     f"{q.get('ssim_vs_fp32_student', 1.0):.3f} |")
    lines += ["", f"**Verdict:** {verdict}.", "", f"Command: `{result['command']}`", ""]
    (args.out / "openvino_nncf.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
