"""Feature extractors for FID.

Inception features mean little on 16x16 grey digits, so FID on the zoo data uses a small classifier
trained on that data by ``deploykit zoo train`` (the same recipe as FID's Inception: the penultimate
activations of a network that recognises the classes).
"""

from __future__ import annotations

import torch
from torch import nn


class DigitsClassifier(nn.Module):
    """A small CNN for 16x16 digits; ``features()`` returns the 128-d penultimate activations."""

    num_features = 128

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(64 * 4 * 4, self.num_features), nn.ReLU(),
        )
        self.head = nn.Linear(self.num_features, num_classes)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """``images`` in [-1, 1], shape (N, 1, 16, 16)."""
        return self.body(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))
