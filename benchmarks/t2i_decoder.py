"""Which smaller VAE decoder: a pruned KL decoder or a TAESD-style tiny one? Measured on zoo:shapes.

    python benchmarks/t2i_decoder.py [--samples 288] [--steps 600]

The teacher pipeline generates latents from the distill prompts (recipes/prompts/shapes_distill.txt); the
last 32 are held out. Each candidate is distilled from the teacher's decoder on the others with the same
budget (deploykit.distill.decoder: the same steps, batch, learning rate and augmentation), then measured on
the held-out latents: PSNR / SSIM against the teacher decoder's images, prompt accuracy of its images (the
zoo's attribute classifier, against the prompts the latents were generated from), MACs and parameters,
and decode time on torch-cpu with every decoder round-robin in one run. Candidates:

- ``pruned-kl``: the teacher's own AutoencoderKL decoder, channels pruned by magnitude with torch-pruning's
  DepGraph (ratio 0.5, channel counts multiples of 4; GroupNorm groups and the mid-block attention follow),
  then distilled: prune + distill;
- ``tiny-W``: diffusers' DecoderTiny (TAESD's decoder) at width W, blocks (3, 3, 1), trained from scratch.

Writes t2i_decoder.json and t2i_decoder.md into --out.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import sys
from pathlib import Path

import torch
from rich.console import Console
from torch import nn

from deploykit.artifact import package_versions
from deploykit.bench import measure_group_against
from deploykit.bench.machine import command_line, device_info

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
HELD_OUT = 32
console = Console(stderr=True)


class KLDecoder(nn.Module):
    """An AutoencoderKL's decoding path as one module: ``latents / scaling_factor`` -> image."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.post_quant_conv, self.decoder = vae.post_quant_conv, vae.decoder

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z))


def pruned_kl(vae: nn.Module, ratio: float, example: torch.Tensor) -> nn.Module:
    import torch_pruning as tp

    from deploykit.models.sync import sync_diffusers_attributes

    model = KLDecoder(copy.deepcopy(vae)).eval()
    pruner = tp.pruner.MetaPruner(model, example, importance=tp.importance.MagnitudeImportance(p=2), pruning_ratio=ratio,
                                  ignored_layers=[model.decoder.conv_out, model.post_quant_conv], round_to=4)
    pruner.step()
    sync_diffusers_attributes(model)
    return model


def macs(model, z: torch.Tensor) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(z)
    return counter.get_total_flops() // 2


def main() -> int:
    from deploykit.distill.decoder import DecoderDistillConfig, distill_decoder
    from deploykit.eval import psnr_ssim
    from deploykit.eval.attributes import CLASSIFIER_FILE, load_attribute_classifier
    from deploykit.eval.prompt_accuracy import prompt_accuracy
    from deploykit.models import count_params
    from deploykit.models.diffusers_pipelines import load_pretrained_pipeline
    from deploykit.models.vae_decoder import tiny_decoder_for
    from deploykit.runtime import make_pipeline_scheduler
    from deploykit.stages.data import read_prompts
    from deploykit.zoo import get_entry

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="shapes", help="zoo pipeline teacher (shapes-tiny for a quick check)")
    parser.add_argument("--samples", type=int, default=288)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--widths", type=int, nargs="+", default=[16, 32])
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()

    folder = get_entry(args.teacher).folder
    pipe = load_pretrained_pipeline(folder).to(torch.float32)
    pipe.scheduler = make_pipeline_scheduler("ddim", dict(pipe.scheduler.config))
    pipe.set_progress_bar_config(disable=True)
    prompts = read_prompts(REPO / "recipes" / "prompts" / "shapes_distill.txt")
    prompts = [prompts[(i * 7) % len(prompts)] for i in range(args.samples)]  # spread over the file
    latents = []
    with torch.no_grad():
        for start in range(0, len(prompts), 16):
            chunk = prompts[start:start + 16]
            gens = [torch.Generator().manual_seed(start + i) for i in range(len(chunk))]
            out = pipe(chunk, num_inference_steps=20, guidance_scale=7.5, height=64, width=64, generator=gens,
                       output_type="latent").images
            latents.append(out / pipe.vae.config.scaling_factor)
            console.print(f"latents {start + len(chunk)}/{len(prompts)}")
    latents = torch.cat(latents)
    train, test, test_prompts = latents[:-HELD_OUT], latents[-HELD_OUT:], prompts[-HELD_OUT:]
    vae = pipe.vae.eval()
    teacher = KLDecoder(vae).eval()
    classifier = load_attribute_classifier(folder / CLASSIFIER_FILE)
    config = DecoderDistillConfig(steps=args.steps, batch_size=args.batch_size)
    candidates = {"pruned-kl": pruned_kl(vae, 0.5, test[:1])}
    levels = len(vae.config.block_out_channels)
    candidates.update({f"tiny-{w}": tiny_decoder_for(vae, [w] * levels, [3] * (levels - 1) + [1]) for w in args.widths})
    with torch.no_grad():
        reference = teacher(test).clamp(-1, 1)
    results = {"teacher": {"params": count_params(teacher), "macs": macs(teacher, test[:1]),
                           "prompt_accuracy": prompt_accuracy(classifier, reference, test_prompts)["accuracy"]}}
    for name, model in candidates.items():
        console.print(f"distilling {name}")
        losses = distill_decoder(model, teacher, train, config)
        with torch.no_grad():
            images = model(test).clamp(-1, 1)
        results[name] = {"params": count_params(model), "macs": macs(model, test[:1]), **psnr_ssim(images, reference),
                         "prompt_accuracy": prompt_accuracy(classifier, images, test_prompts)["accuracy"],
                         "final_loss": sum(losses[-50:]) / len(losses[-50:])}
    models = {"teacher": teacher, **candidates}
    before = [round(x, 2) for x in os.getloadavg()]
    with torch.no_grad():
        latency, ratios = measure_group_against({k: (lambda m=m: m(test)) for k, m in models.items()}, "teacher",
                                                warmup=3, runs=args.runs)
    for name in models:
        results[name]["p50_ms"] = latency[name].p50_ms
        results[name]["speedup"] = latency["teacher"].p50_ms / latency[name].p50_ms
    versions = package_versions()
    result = {"command": command_line("benchmarks/t2i_decoder.py"), "teacher": f"zoo:{args.teacher}",
              "date": datetime.date.today().isoformat(),
              "machine": {"platform": platform.platform(), **device_info()},
              "packages": {k: versions.get(k) for k in ("torch", "diffusers", "torch-pruning")},
              "latents": {"train": len(train), "held_out": len(test), "steps": 20, "guidance_scale": 7.5},
              "distill": config.__dict__, "timing": {"batch": len(test), "runs": args.runs, "load_before": before,
                                                      "load_after": [round(x, 2) for x in os.getloadavg()]},
              "results": results}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "t2i_decoder.json").write_text(json.dumps(result, indent=2) + "\n")
    t = result["timing"]
    lines = [f"# t2i_decoder: a pruned KL decoder against tiny decoders, zoo:{args.teacher}", "",
             f"`{result['command']}` on {result['machine']['cpu']}, {result['machine']['threads']} threads, {result['date']}; "
             f"torch {versions.get('torch')}, diffusers {versions.get('diffusers')}. Every candidate "
             f"distilled from the teacher's decoder for {config.steps} steps (batch {config.batch_size}) on {len(train)} "
             f"teacher latents, measured on {len(test)} held-out ones. Decode time: torch-cpu, batch {t['batch']}, all "
             f"decoders round-robin in one run of {t['runs']} rounds (load {t['load_before'][0]} -> {t['load_after'][0]}).",
             "", "| decoder | params | MACs / image | PSNR dB vs teacher decoder | SSIM | prompt accuracy | p50 ms | speedup |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        psnr, ssim = (f"{r['psnr_vs_teacher']:.2f}", f"{r['ssim_vs_teacher']:.3f}") if name != "teacher" else ("–", "–")
        lines.append(f"| {name} | {r['params'] / 1e3:.0f}k | {r['macs'] / 1e6:.1f}M | {psnr} | {ssim} "
                     f"| {100 * r['prompt_accuracy']:.1f}% | {r['p50_ms']:.1f} | {r['speedup']:.2f}x |")
    (args.out / "t2i_decoder.md").write_text("\n".join(lines) + "\n")
    console.print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
