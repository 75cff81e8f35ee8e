"""Quality: FID and KID on a pluggable feature extractor, fidelity to the teacher, sample grids."""

from deploykit.eval.fid import extract_features, feature_stats, fid, frechet_distance, split_reference
from deploykit.eval.fidelity import psnr_ssim
from deploykit.eval.grid import save_comparison_grid
from deploykit.eval.kid import KID, kernel_inception_distance

__all__ = ["KID", "extract_features", "feature_stats", "fid", "frechet_distance", "kernel_inception_distance", "psnr_ssim",
           "save_comparison_grid", "split_reference"]
