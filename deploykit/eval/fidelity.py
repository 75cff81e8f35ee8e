"""Fidelity to the teacher: the same seeds and noise through both, compared pixel by pixel."""

from __future__ import annotations

import torch
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure


def to_unit(images: torch.Tensor) -> torch.Tensor:
    return ((images.clamp(-1, 1) + 1) / 2).float()


def psnr_ssim(images: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    """Mean PSNR (dB) and SSIM of ``images`` against ``reference``, both in [-1, 1]."""
    a, b = to_unit(images), to_unit(reference)
    psnr = peak_signal_noise_ratio(a, b, data_range=1.0, reduction="none", dim=(1, 2, 3))
    # 16x16 images: a 7-pixel window keeps SSIM's local statistics meaningful
    ssim = structural_similarity_index_measure(a, b, data_range=1.0, kernel_size=7 if a.shape[-1] < 32 else 11)
    return {"psnr_vs_teacher": float(psnr.clamp(max=100).mean()), "ssim_vs_teacher": float(ssim)}
