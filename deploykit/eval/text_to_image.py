"""Text-to-image quality: does a generated image show what its prompt asked for?

Two judges, one per kind of teacher:

- a zoo text-to-image teacher ships an attribute classifier trained apart from it
  (:mod:`deploykit.eval.attributes`): *prompt accuracy* is the share of asked attributes it reads back
  (overall, per attribute, and split into attribute combinations the teacher was trained on and those
  held out of its training), and FID runs on its features against rendered images of the same
  prompts, with the floor of real renders the reference does not hold
  (:mod:`deploykit.eval.prompt_accuracy`);
- a hub teacher is judged by CLIP, where the user has CLIP weights: torchmetrics' CLIP score
  (100 x the cosine of image and prompt embeddings), with the model loaded here from a local folder or
  the hub cache as safetensors, never pickles.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from deploykit.errors import InputError
from deploykit.eval.attributes import AttributeClassifier
from deploykit.eval.fidelity import to_unit
from deploykit.eval.prompt_accuracy import (
    chance_accuracy,
    classifier_fid,
    fid_reference,
    prompt_accuracy,
    shuffled_prompt_accuracy,
)

SPLITS = ("trained", "held_out")
CLIP_BATCH = 64


@torch.no_grad()
def generate(pipe, prompts: list[str], seed: int, steps: int, guidance_scale: float, side: int, batch_size: int,
             advance: Callable[[int], None] | None = None) -> torch.Tensor:
    """Images in [-1, 1] from a diffusers SD pipeline, one per prompt; image ``i`` starts from the noise of seed
    ``seed + i`` whatever the batch, so every model compared gets the same prompt and noise for each image."""
    images = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        generators = [torch.Generator().manual_seed(seed + start + i) for i in range(len(chunk))]
        out = pipe(chunk, num_inference_steps=steps, guidance_scale=guidance_scale, height=side, width=side,
                   output_type="pt", generator=generators).images
        images.append(out * 2 - 1)  # [0, 1] -> [-1, 1], as the metrics and grids take them
        if advance is not None:
            advance(len(chunk))
    return torch.cat(images)


class PromptJudge:
    """Prompt accuracy and classifier FID of images generated for ``prompts`` (one image per prompt, in order).

    The FID reference is rendered for exactly these prompts (four renders each), and the floor is one
    more render per prompt from another seed: real images scored the way the generated ones are.
    """

    def __init__(self, classifier: AttributeClassifier, prompts: list[str]):
        self.classifier = classifier.eval()
        self.prompts = list(prompts)
        self.reference = fid_reference(self.classifier, self.prompts)

    def score(self, images: torch.Tensor) -> tuple[dict[str, float], dict]:
        """(the report's flat metrics, the full prompt-accuracy breakdown) for ``images`` in [-1, 1]."""
        accuracy = prompt_accuracy(self.classifier, images, self.prompts)
        flat = {"prompt_accuracy": accuracy["accuracy"], "fid": classifier_fid(self.classifier, images, self.reference)}
        for split in SPLITS:
            if split in accuracy:
                flat[f"prompt_accuracy_{split}"] = accuracy[split]["accuracy"]
        return flat, accuracy

    def baselines(self, teacher_images: torch.Tensor) -> dict:
        """What the scale means: uniform guessing, and the teacher's own images read against shuffled prompts
        (an image that ignores its prompt scores this)."""
        return {"chance": chance_accuracy(),
                "teacher_shuffled_prompts": shuffled_prompt_accuracy(self.classifier, teacher_images, self.prompts)["accuracy"],
                "fid_real_floor": self.reference["floor"],
                "fid_reference_images": self.reference["reference_images"],
                "fid_floor_images": self.reference["floor_images"]}


def load_clip(source: str | Path):
    """(CLIPModel, CLIPProcessor) from a local folder or a hub id (the hub cache when offline), safetensors only."""
    from transformers import CLIPModel, CLIPProcessor

    try:
        model = CLIPModel.from_pretrained(source, use_safetensors=True).eval()
        processor = CLIPProcessor.from_pretrained(source)
    except (OSError, ValueError) as e:
        raise InputError(f"eval.clip_model {source}: no CLIP model and processor loadable from there ({e})") from None
    return model, processor


@torch.no_grad()
def clip_score(images: torch.Tensor, prompts: list[str], clip) -> float:
    """Mean CLIP score of ``images`` ([-1, 1]) against their ``prompts``; ``clip`` is :func:`load_clip`'s pair."""
    from torchmetrics.functional.multimodal import clip_score as torchmetrics_clip_score

    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images for {len(prompts)} prompts")
    pixels = (to_unit(images) * 255).round().to(torch.uint8)  # the processor rescales 0..255 itself
    total = 0.0
    for start in range(0, len(prompts), CLIP_BATCH):
        chunk = slice(start, start + CLIP_BATCH)
        score = torchmetrics_clip_score(list(pixels[chunk]), prompts[chunk], model_name_or_path=lambda: clip)
        total += float(score) * len(prompts[chunk])
    return total / len(prompts)
