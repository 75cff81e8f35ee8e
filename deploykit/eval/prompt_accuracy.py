"""Prompt accuracy: the share of asked attributes that the attribute classifier reads back.

The offline analogue of CLIP score for the shapes teacher. Each prompt asks for five attributes
(count, size, colour, shape, position; the grammar is ``deploykit.zoo.shapes``); the classifier
reads each generated image, and every asked attribute read back counts as one hit. Reported overall,
per attribute, as the share of images with every attribute right, and split into combinations the
teacher was trained on and those held out of its training.

Also here: the FID references for that classifier's features. The reference set and the real-image
floor are rendered for the same prompts from two different seeds, so the floor is computed on images
the reference set does not contain.
"""

from __future__ import annotations

import numpy as np
import torch

from deploykit.eval.attributes import AttributeClassifier
from deploykit.eval.fid import extract_features, feature_stats, frechet_distance
from deploykit.zoo.shapes import ATTRIBUTES, Attributes, parse_prompt, render_many

REFERENCE_SEED = 1_000_003
FLOOR_SEED = 2_000_003
FID_REFERENCE_FILE = "fid_reference.safetensors"  # shipped beside the classifier: the statistics for the eval prompts


def _scores(asked: list[Attributes], read: dict[str, list[str]]) -> dict:
    hits = {name: [getattr(a, name) == read[name][i] for i, a in enumerate(asked)] for name in ATTRIBUTES}
    n = len(asked)
    per_attribute = {name: sum(h) / n for name, h in hits.items()}
    return {"accuracy": sum(per_attribute.values()) / len(per_attribute),
            "all_attributes": sum(all(hits[name][i] for name in ATTRIBUTES) for i in range(n)) / n,
            "per_attribute": per_attribute, "images": n}


def prompt_accuracy(classifier: AttributeClassifier, images: torch.Tensor, prompts: list[str]) -> dict:
    """Score ``images`` (N, 3, 64, 64) in [-1, 1] against the ``prompts`` they were generated from.

    Returns ``accuracy`` (share of asked attributes read back), ``all_attributes`` (share of images
    with all five right), ``per_attribute``, ``images``, and the same under ``trained`` and
    ``held_out`` (combinations held out of the teacher's training), where there are any.
    ``ValueError`` if a prompt is not a shapes caption or the counts differ.
    """
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images for {len(prompts)} prompts")
    asked = [parse_prompt(p) for p in prompts]
    read = classifier.read(images)
    result = _scores(asked, read)
    for split, keep in (("trained", False), ("held_out", True)):
        idx = [i for i, a in enumerate(asked) if a.held_out == keep]
        if idx:
            result[split] = _scores([asked[i] for i in idx], {k: [v[i] for i in idx] for k, v in read.items()})
    return result


def shuffled_prompt_accuracy(classifier: AttributeClassifier, images: torch.Tensor, prompts: list[str],
                             seed: int = 0) -> dict:
    """The same score with the prompts shuffled: what an image that ignores its prompt gets (near chance)."""
    perm = np.random.default_rng(seed).permutation(len(prompts))
    return prompt_accuracy(classifier, images, [prompts[i] for i in perm])


def chance_accuracy() -> float:
    """Prompt accuracy of uniform guessing, one attribute at a time."""
    return sum(1 / len(values) for values in ATTRIBUTES.values()) / len(ATTRIBUTES)


def render_prompts(prompts: list[str], seed: int) -> torch.Tensor:
    """Rendered ground truth for each prompt (in [-1, 1]); different seeds give different images."""
    return render_many([parse_prompt(p) for p in prompts], seed)


def fid_reference(classifier: AttributeClassifier, prompts: list[str], per_prompt: int = 4) -> dict:
    """FID statistics of rendered images for ``prompts``, and the real-image floor on a disjoint render.

    Returns ``mu`` and ``sigma`` of ``per_prompt`` renders of each prompt (seed :data:`REFERENCE_SEED`),
    and ``floor``: the FID of one other render per prompt (seed :data:`FLOOR_SEED`, so none of the
    reference's images) against them, the best that one generated image per prompt can score.
    """
    mu, sigma = feature_stats(extract_features(classifier, render_prompts(prompts * per_prompt, REFERENCE_SEED)))
    floor = frechet_distance(*feature_stats(extract_features(classifier, render_prompts(prompts, FLOOR_SEED))), mu, sigma)
    return {"mu": mu, "sigma": sigma, "floor": floor, "reference_images": len(prompts) * per_prompt,
            "floor_images": len(prompts)}


def classifier_fid(classifier: AttributeClassifier, images: torch.Tensor, reference: dict) -> float:
    """FID of ``images`` on the classifier's penultimate features against :func:`fid_reference`'s statistics."""
    return frechet_distance(*feature_stats(extract_features(classifier, images)), reference["mu"], reference["sigma"])


def save_fid_reference(reference: dict, path) -> None:
    from deploykit.io import save_tensors

    save_tensors(path, {"mu": torch.from_numpy(reference["mu"]), "sigma": torch.from_numpy(reference["sigma"])})


def load_fid_reference(path) -> dict:
    """The shipped statistics (float64 ``mu``, ``sigma``), as :func:`classifier_fid` takes them."""
    from deploykit.io import load_tensors

    tensors = load_tensors(path)
    return {"mu": tensors["mu"].numpy(), "sigma": tensors["sigma"].numpy()}
