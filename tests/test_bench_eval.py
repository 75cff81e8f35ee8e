import pytest
import torch
from PIL import Image

from deploykit.bench import latency
from deploykit.eval import psnr_ssim, save_comparison_grid


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


def test_psnr_ssim_against_the_teacher():
    gen = torch.Generator().manual_seed(0)  # the thresholds below hold for this draw, whatever ran before
    ref = torch.rand(4, 1, 16, 16, generator=gen) * 2 - 1
    same = psnr_ssim(ref.clone(), ref)
    assert same["ssim_vs_teacher"] == pytest.approx(1.0, abs=1e-5) and same["psnr_vs_teacher"] >= 99
    noisy = psnr_ssim((ref + 0.2 * torch.randn(ref.shape, generator=gen)).clamp(-1, 1), ref)
    assert 10 < noisy["psnr_vs_teacher"] < 30 and noisy["ssim_vs_teacher"] < 0.95


def test_comparison_grid_is_a_png_with_one_block_per_model(tmp_path):
    images = torch.rand(8, 1, 16, 16) * 2 - 1
    save_comparison_grid(tmp_path / "grid.png", {"teacher": images, "student": images}, cols=4, scale=2)
    img = Image.open(tmp_path / "grid.png")
    # two blocks of 4 columns x (16 + 1) px, scaled 2x, with a 16 px gap
    assert img.width == 2 * (4 * 17 * 2) + 16


def test_eval_scores_fid_and_kid_against_a_reference_the_floor_is_not_drawn_from(built_artifact):
    """The real-image floor is recomputed here from the other half of the real images; a floor drawn
    from the reference itself (as before) gives a different, smaller number."""
    import json

    from deploykit.eval import extract_features, feature_stats, frechet_distance, split_reference
    from deploykit.stages.data import feature_extractor, teacher_meta, training_images

    out, _, _ = built_artifact
    report = json.loads((out / "report.json").read_text())
    ev = report["eval"]
    ref, split = ev["reference"], ev["reference"]["split"]
    for role in ("teacher", "pruned", "student"):
        assert {"fid", "kid"} <= set(report[role]["quality"]) and role in ref["kid"]["std"]
    assert split["reference_images"] + 898 == split["real_images"] == 1797
    assert split["floor_images"] == ev["num_samples"] == ref["kid"]["subset_size"] == 32

    teacher_dir = next(out.glob("stages/*/teacher.json")).parent
    extractor, real = feature_extractor(teacher_dir), training_images(teacher_meta(teacher_dir))
    reference, floor = split_reference(real)
    stats = feature_stats(extract_features(extractor, reference))
    assert ref["fid_real_subset"] == pytest.approx(
        frechet_distance(*feature_stats(extract_features(extractor, floor[:32])), *stats), rel=1e-9)
    inside = reference[:32]  # the old floor: a subset of the reference itself
    assert frechet_distance(*feature_stats(extract_features(extractor, inside)), *stats) < ref["fid_real_subset"]
