import numpy as np
import pytest
import torch
from PIL import Image

from deploykit.bench import latency
from deploykit.eval import frechet_distance, psnr_ssim, save_comparison_grid


def test_measure_pair_interleaves_and_reports_p50_ratio(monkeypatch):
    """A fake clock: the teacher call costs 30 ms, the student 10 ms; every figure follows."""
    clock = {"now": 0.0}
    calls = []
    monkeypatch.setattr(latency.time, "perf_counter", lambda: clock["now"])

    def teacher():
        calls.append("T")
        clock["now"] += 0.030

    def student():
        calls.append("S")
        clock["now"] += 0.010

    result = latency.measure_pair(teacher, student, warmup=2, runs=6)
    assert result.teacher.p50_ms == pytest.approx(30) and result.student.p50_ms == pytest.approx(10)
    assert result.speedup == pytest.approx(3) and result.speedup_pair_median == pytest.approx(3)
    assert result.teacher.runs == 6
    timed = calls[4:]  # after warm-up
    assert timed[:4] == ["T", "S", "S", "T"], "pairs alternate who goes first"


def test_frechet_distance_is_zero_for_equal_stats_and_grows_with_the_mean_shift():
    rng = np.random.default_rng(0)
    feats = rng.standard_normal((500, 8))
    mu, sigma = feats.mean(0), np.cov(feats, rowvar=False)
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0, abs=1e-6)
    shift = np.full(8, 0.5)
    assert frechet_distance(mu + shift, sigma, mu, sigma) == pytest.approx(float(shift @ shift), rel=1e-6)


def test_psnr_ssim_against_the_teacher():
    ref = torch.rand(4, 1, 16, 16) * 2 - 1
    same = psnr_ssim(ref.clone(), ref)
    assert same["ssim_vs_teacher"] == pytest.approx(1.0, abs=1e-5) and same["psnr_vs_teacher"] >= 99
    noisy = psnr_ssim((ref + 0.2 * torch.randn_like(ref)).clamp(-1, 1), ref)
    assert 10 < noisy["psnr_vs_teacher"] < 30 and noisy["ssim_vs_teacher"] < 0.95


def test_comparison_grid_is_a_png_with_one_block_per_model(tmp_path):
    images = torch.rand(8, 1, 16, 16) * 2 - 1
    save_comparison_grid(tmp_path / "grid.png", {"teacher": images, "student": images}, cols=4, scale=2)
    img = Image.open(tmp_path / "grid.png")
    # two blocks of 4 columns x (16 + 1) px, scaled 2x, with a 16 px gap
    assert img.width == 2 * (4 * 17 * 2) + 16
