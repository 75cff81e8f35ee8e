"""Fréchet distance between feature distributions (the FID formula, any feature extractor)."""

from __future__ import annotations

import warnings

import numpy as np
import torch
from scipy import linalg


def feature_stats(features: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    f = np.asarray(features, dtype=np.float64)
    return f.mean(axis=0), np.cov(f, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^1/2), as in pytorch-fid."""
    with warnings.catch_warnings():
        # few samples give singular covariances; the non-finite case is handled below
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        # near-singular product: regularise as pytorch-fid does
        offset = np.eye(sigma1.shape[0]) * 1e-6
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    covmean = covmean.real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


@torch.no_grad()
def extract_features(extractor: torch.nn.Module, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    extractor.eval()
    return torch.cat([extractor.features(chunk) for chunk in images.split(batch_size)])


def fid(extractor: torch.nn.Module, images: torch.Tensor, reference: tuple[np.ndarray, np.ndarray]) -> float:
    mu, sigma = feature_stats(extract_features(extractor, images))
    return frechet_distance(mu, sigma, *reference)
