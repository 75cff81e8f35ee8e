"""Does a shapes teacher take the position from its prompt, or from the noise? `python benchmarks/shapes_position_leak.py`.

Two measurements per teacher folder (a `StableDiffusionPipeline` saved by `deploykit zoo train shapes`),
on rendered images of the trained combinations, at several training timesteps, with one noise draw:

- *position in the noisy latent*: the UNet's prediction of x0 from ``x_t`` with the empty prompt, decoded
  and read by the attribute classifier. Where the position reads back well above chance (20%), the noisy
  sample still shows where the shape is, and the loss at that timestep cannot teach position from text.
- *what the prompt's words are worth*: the denoising loss (the teacher's own target) with the right caption,
  with the same caption at another position, and at another colour. A teacher that ignores "at the top
  left" scores the same with the wrong position as with the right one.

Writes `benchmarks/results/shapes_position_leak.{json,md}`.

    python benchmarks/shapes_position_leak.py --teachers before=/tmp/old_shapes after=deploykit/zoo/weights/shapes
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import sys
from pathlib import Path

import numpy as np
import torch

from deploykit.bench.machine import command_line, device_info
from deploykit.eval.attributes import CLASSIFIER_FILE, load_attribute_classifier
from deploykit.models.objectives import denoising_target
from deploykit.zoo import get_entry, shapes
from deploykit.zoo.tokenizer import MAX_LENGTH

HERE = Path(__file__).resolve().parent
TIMESTEPS = (300, 500, 700, 850, 950, 999)


@torch.no_grad()
def measure(folder: Path, classifier, images: int, seed: int) -> dict:
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None).to(torch.float32)
    unet, vae = pipe.unet.eval(), pipe.vae.eval()
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    rng = np.random.default_rng(seed)
    attrs = shapes.sample_attributes(images, seed)
    others = {"wrong position": [dataclasses.replace(a, position=str(rng.choice([p for p in shapes.POSITIONS if p != a.position])))
                                 for a in attrs],
              "wrong colour": [dataclasses.replace(a, colour=str(rng.choice([c for c in shapes.COLOURS if c != a.colour])))
                               for a in attrs]}

    def encode(prompts: list[str]) -> torch.Tensor:
        ids = pipe.tokenizer(prompts, padding="max_length", max_length=MAX_LENGTH, truncation=True, return_tensors="pt").input_ids
        return pipe.text_encoder(ids)[0]

    captions = {"right caption": encode([shapes.caption(a) for a in attrs]),
                **{name: encode([shapes.caption(a) for a in alt]) for name, alt in others.items()}}
    empty = encode([""]).expand(images, -1, -1)
    sf = vae.config.scaling_factor
    x0 = vae.encode(shapes.render_many(attrs, seed)).latent_dist.mean * sf
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    rows = []
    for t in TIMESTEPS:
        ts = torch.full((images,), t)
        xt = scheduler.add_noise(x0, noise, ts)
        target = denoising_target(scheduler, x0, noise, ts)
        # diffusers' own x0 estimate, for whatever the teacher predicts (noise, velocity or sample)
        x0_guess = scheduler.step(unet(xt, ts, encoder_hidden_states=empty).sample, t, xt).pred_original_sample
        decoded = vae.decode(x0_guess / sf).sample
        read = classifier.read(decoded.clamp(-1, 1))["position"]
        a = scheduler.alphas_cumprod[t]
        rows.append({"t": t, "snr": float(a / (1 - a)),
                     "position_from_noisy_latent": float(np.mean([r == x.position for r, x in zip(read, attrs)])),
                     "loss": {name: float(((unet(xt, ts, encoder_hidden_states=h).sample - target) ** 2).mean())
                              for name, h in captions.items()}})
    return {"folder": str(folder), "scheduler": {k: pipe.scheduler.config[k] for k in ("beta_schedule", "beta_start", "beta_end",
                                                                                      "prediction_type")},
            "rows": rows}


def markdown(result: dict) -> str:
    lines = ["# Does the shapes teacher take the position from its prompt?", "",
             f"`{result['command']}` on {result['machine']['cpu']}, {result['date']}. {result['images']} rendered images of "
             "trained combinations, one noise draw per image. *Position in x_t*: the teacher's x0 prediction from the "
             "noisy latent with the empty prompt, decoded and read by the shipped attribute classifier (chance 20%). "
             "*Loss*: the teacher's denoising loss (its own target: noise or velocity) with the right caption, the "
             "caption at another position, and at another colour.", ""]
    for name, teacher in result["teachers"].items():
        s = teacher["scheduler"]
        lines += [f"## {name}: {s['beta_schedule']} betas {s['beta_start']}-{s['beta_end']}, {s['prediction_type']}", "",
                  "| t | SNR | position in x_t | loss, right caption | wrong position | wrong colour |",
                  "|---|---|---|---|---|---|"]
        for r in teacher["rows"]:
            loss = r["loss"]
            lines.append(f"| {r['t']} | {r['snr']:.2g} | {r['position_from_noisy_latent']:.1%} | {loss['right caption']:.4f} | "
                         f"{loss['wrong position']:.4f} | {loss['wrong colour']:.4f} |")
        lines.append("")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teachers", nargs="+", default=[f"shipped={get_entry('shapes').folder}"],
                        help="NAME=FOLDER pairs: StableDiffusionPipeline folders trained by `deploykit zoo train shapes`")
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    teachers = dict(t.split("=", 1) for t in args.teachers if "=" in t)
    missing = [f for f in teachers.values() if not (Path(f) / "model_index.json").is_file()]
    if len(teachers) != len(args.teachers) or missing:
        print(f"error: --teachers takes NAME=FOLDER pairs of pipeline folders (not found: {', '.join(missing) or '-'})",
              file=sys.stderr)
        return 2
    torch.set_num_threads(2)
    classifier = load_attribute_classifier(get_entry("shapes").folder / CLASSIFIER_FILE)
    result = {"command": command_line("benchmarks/shapes_position_leak.py"), "date": datetime.date.today().isoformat(),
              "machine": device_info(), "images": args.images, "seed": args.seed,
              "teachers": {name: measure(Path(folder), classifier, args.images, args.seed) for name, folder in teachers.items()}}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "shapes_position_leak.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "shapes_position_leak.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
