"""The attribute classifier: reads count, size, colour, shape and position back from a shapes image.

A small CNN with one head per attribute, trained on rendered images by ``deploykit zoo train``
separately from the teacher (its own seed and images). It is the offline stand-in for CLIP: prompt
accuracy asks it what an image shows; FID uses its penultimate activations as Inception's are used.
The spatial map is flattened, not pooled, so that position (and count) survive to the heads.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

CLASSIFIER_FILE = "attributes.safetensors"


def _conv(cin: int, cout: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]


class AttributeClassifier(nn.Module):
    """64x64 RGB in [-1, 1] -> one logit vector per attribute; ``features()`` is the 256-d penultimate layer."""

    num_features = 256

    def __init__(self, attributes: dict[str, tuple[str, ...]]):
        super().__init__()
        self.attributes = {name: tuple(values) for name, values in attributes.items()}
        self.body = nn.Sequential(
            *_conv(3, 24), *_conv(24, 48, 2), *_conv(48, 64, 2), *_conv(64, 96, 2),  # 64 -> 8x8
            nn.Conv2d(96, 64, 1), nn.ReLU(), nn.Flatten(),
            nn.Linear(64 * 8 * 8, self.num_features), nn.ReLU(),
        )
        self.heads = nn.ModuleDict({name: nn.Linear(self.num_features, len(values))
                                    for name, values in self.attributes.items()})

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(images)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.features(images)
        return {name: head(f) for name, head in self.heads.items()}

    @torch.no_grad()
    def read(self, images: torch.Tensor, batch_size: int = 256) -> dict[str, list[str]]:
        """What each image shows: attribute -> one value per image."""
        self.eval()
        idx: dict[str, list[int]] = {name: [] for name in self.attributes}
        for chunk in images.float().split(batch_size):
            for name, logits in self(chunk).items():
                idx[name] += logits.argmax(1).tolist()
        return {name: [self.attributes[name][i] for i in idx[name]] for name in self.attributes}


def load_attribute_classifier(path: str | Path) -> AttributeClassifier:
    """The shipped classifier (a safetensors file whose metadata names the attributes and their values)."""
    import json

    from safetensors import safe_open

    from deploykit.io import load_tensors

    with safe_open(str(path), "pt") as f:
        attributes = json.loads(f.metadata()["attributes"])
    model = AttributeClassifier(attributes)
    model.load_state_dict(load_tensors(path))
    return model.eval()


def save_attribute_classifier(model: AttributeClassifier, path: str | Path) -> None:
    import json

    from deploykit.io import save_tensors

    save_tensors(path, model.state_dict(), metadata={"attributes": json.dumps(model.attributes)})
