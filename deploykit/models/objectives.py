"""What a diffusion UNet is trained to predict: its scheduler's ``prediction_type`` decides.

SD1.5 and the zoo's digits predict the noise; SD 2.x's 768 models predict the velocity
``v = sqrt(alpha_bar) * noise - sqrt(1 - alpha_bar) * x0`` (Salimans & Ho 2022). Recovery training and
gradient-based pruning importance must use the target the teacher was trained on, or they teach the
student a different function from the one the scheduler samples with.
"""

from __future__ import annotations

import torch


def denoising_target(noise_scheduler, sample: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """The regression target for ``noise_scheduler.add_noise(sample, noise, timesteps)``."""
    kind = noise_scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return noise_scheduler.get_velocity(sample, noise, timesteps)
    if kind == "sample":
        return sample
    raise ValueError(f"prediction_type {kind!r} is not supported (epsilon, v_prediction or sample)")
