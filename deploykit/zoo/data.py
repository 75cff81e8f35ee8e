"""Data sets the zoo teachers are trained on. They ship inside installed packages: no download."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def load_digits_images(resolution: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's handwritten digits (1,797 images, 8x8, 17 grey levels), upscaled.

    Returns ``(images, labels)``: images ``(N, 1, resolution, resolution)`` float32 in [-1, 1].
    Bilinear upscaling keeps the strokes smooth, so the model learns shapes, not the 8x8 block grid.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.from_numpy(digits.images.astype(np.float32) / 16.0).unsqueeze(1)
    if resolution != images.shape[-1]:
        images = F.interpolate(images, size=(resolution, resolution), mode="bilinear", align_corners=False)
    images = images.clamp(0.0, 1.0) * 2.0 - 1.0
    labels = torch.from_numpy(digits.target.astype(np.int64))
    return images, labels


def split_indices(n: int, held_out: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed train / held-out split; the same seed always gives the same split."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_held = int(round(n * held_out))
    return perm[n_held:], perm[:n_held]
