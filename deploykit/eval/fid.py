"""Fréchet distance between feature distributions (the FID formula, any feature extractor)."""

from __future__ import annotations

import warnings

import numpy as np
import torch
from scipy import linalg


def feature_stats(features: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    f = np.asarray(features, dtype=np.float64)
    return f.mean(axis=0), np.cov(f, rowvar=False)


IMAGINARY_TOLERANCE = 1e-3  # pytorch-fid's bound on the imaginary part of the square root's diagonal


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^1/2), as in pytorch-fid.

    S1 S2 is similar to S1^1/2 S2 S1^1/2, so its eigenvalues are real and non-negative and its square
    root is real up to rounding. An imaginary part above :data:`IMAGINARY_TOLERANCE` on the diagonal
    means the inputs are not covariances or ``sqrtm`` failed; that raises ``ValueError`` (as in
    pytorch-fid) instead of being dropped into a wrong distance.
    """
    mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
    sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(f"Fréchet distance of statistics that do not match: means {mu1.shape} and {mu2.shape}, "
                         f"covariances {sigma1.shape} and {sigma2.shape}")
    with warnings.catch_warnings():
        # few samples give singular covariances; the non-finite case is handled below
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(sigma1 @ sigma2)
        if not np.isfinite(covmean).all():
            # near-singular product: regularise as pytorch-fid does
            offset = np.eye(sigma1.shape[0]) * 1e-6
            covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=IMAGINARY_TOLERANCE):
            raise ValueError(f"Imaginary component {np.abs(covmean.imag).max():.3g} in the square root of the "
                             f"covariance product (more than {IMAGINARY_TOLERANCE:g} on its diagonal): the statistics are "
                             "not those of real features, or the square root did not converge")
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


# Fixed, so every build and every sample count scores against the same reference. Not 0: the zoo
# classifier's train / held-out split is the same permutation of the same images with seed 0, and
# sharing it would put every image the classifier never saw into one half.
REAL_SPLIT_SEED = 1


def split_reference(real: torch.Tensor, seed: int = REAL_SPLIT_SEED) -> tuple[torch.Tensor, torch.Tensor]:
    """Real images in two disjoint halves, ``(reference, floor)``, the same for every call with ``seed``.

    The floor (real images scored against the reference like the samples are) must come from images
    the reference does not hold: a subset of the reference itself sits closer to it than any unseen
    sample can, which makes the floor, and so the gap to it, look smaller than it is.
    """
    perm = torch.randperm(len(real), generator=torch.Generator().manual_seed(seed))
    half = len(real) // 2
    return real[perm[half:]], real[perm[:half]]
