"""Quality: FID on a pluggable feature extractor, fidelity to the teacher, sample grids."""

from deploykit.eval.fid import extract_features, feature_stats, fid, frechet_distance
from deploykit.eval.fidelity import psnr_ssim
from deploykit.eval.grid import save_comparison_grid

__all__ = ["extract_features", "feature_stats", "fid", "frechet_distance", "psnr_ssim", "save_comparison_grid"]
