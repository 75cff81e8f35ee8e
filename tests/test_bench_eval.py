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


def test_peers_from_one_window_of_rounds():
    """The fastest student configuration against torch eager and the fastest dense configuration, from known times."""
    from deploykit.bench import Rounds
    from deploykit.bench.peers import Config, peers

    configs = [Config("torch-cpu", "teacher", "fp32"), Config("torch-cpu", "student", "fp32"),
               Config("onnxruntime-cpu", "teacher", "fp32"), Config("onnxruntime-cpu", "student", "fp32"),
               Config("onnxruntime-cpu", "teacher-int8", "int8"), Config("onnxruntime-cpu", "student-int8", "int8")]
    seconds = [2.0, 0.9, 1.4, 0.6, 0.7, 0.3]  # per round; the second round runs 10% slower throughout
    rounds = Rounds({c.key: [s, s * 1.1, s] for c, s in zip(configs, seconds)})
    out = peers(rounds, configs, configs[0])
    assert out["student"] == {"config": "onnxruntime-cpu int8", "model": "student-int8", "p50_ms": pytest.approx(300)}
    eager, dense = out["vs_dense_torch_eager_fp32"], out["vs_fastest_dense"]
    assert eager["config"] == "torch-cpu fp32" and eager["speedup"] == pytest.approx(2.0 / 0.3)
    assert dense["config"] == "onnxruntime-cpu int8" and dense["speedup"] == pytest.approx(0.7 / 0.3)
    assert dense["speedup_pair_median"] == pytest.approx(0.7 / 0.3)  # drift common to a round cancels
    assert out["measured_p50_ms"]["dense"] == pytest.approx({"torch-cpu fp32": 2000, "onnxruntime-cpu fp32": 1400,
                                                             "onnxruntime-cpu int8": 700})
    assert "vs_dense_torch_eager_fp32" not in peers(rounds, configs[2:], None)


def test_peers_count_a_runtimes_own_precision_and_time_it_apart_from_its_fp32():
    """OpenVINO's default precision (bf16 on an AMX Xeon) beat its INT8 there, dense and pruned; the
    peers must pick it as the fastest of both, not the fp32 model of the same name."""
    from deploykit.bench import Rounds
    from deploykit.bench.peers import RUNTIME_DEFAULT, Config, peers

    configs = [Config("torch-cpu", "teacher", "fp32"), Config("openvino-cpu", "teacher", "fp32"),
               Config("openvino-cpu", "teacher", RUNTIME_DEFAULT), Config("openvino-cpu", "teacher-int8", "int8"),
               Config("openvino-cpu", "student", "fp32"), Config("openvino-cpu", "student", RUNTIME_DEFAULT),
               Config("openvino-cpu", "student-int8", "int8")]
    assert len({c.key for c in configs}) == len(configs)
    seconds = [2.6, 1.7, 0.51, 0.53, 0.8, 0.28, 0.34]
    out = peers(Rounds({c.key: [s, s] for c, s in zip(configs, seconds)}), configs, configs[0])
    assert out["student"] == {"config": "openvino-cpu default", "model": "student", "p50_ms": pytest.approx(280)}
    assert out["vs_fastest_dense"]["config"] == "openvino-cpu default"
    assert out["vs_fastest_dense"]["speedup"] == pytest.approx(0.51 / 0.28)
    assert out["vs_dense_torch_eager_fp32"]["speedup"] == pytest.approx(2.6 / 0.28)


def test_peers_time_an_int8_graph_under_the_runtimes_own_precision_apart_from_the_fp32_graph():
    """A QDQ graph handed to OpenVINO with no settings runs its float layers in the CPU's default
    precision: that configuration is timed and reported under its own key and label, never merged with
    the fp32 graph's default or the INT8 graph's fp32 run."""
    from deploykit.bench import Rounds
    from deploykit.bench.peers import RUNTIME_DEFAULT, Config, peers

    configs = [Config("torch-cpu", "teacher", "fp32"),
               Config("openvino-cpu", "teacher", RUNTIME_DEFAULT), Config("openvino-cpu", "teacher-int8", "int8"),
               Config("openvino-cpu", "teacher-int8", RUNTIME_DEFAULT),
               Config("openvino-cpu", "student", RUNTIME_DEFAULT), Config("openvino-cpu", "student-int8", "int8"),
               Config("openvino-cpu", "student-int8", RUNTIME_DEFAULT)]
    assert len({c.key for c in configs}) == len(configs)
    assert len({c.label for c in configs if c.dense}) == sum(c.dense for c in configs)
    seconds = [2.6, 0.51, 0.53, 0.45, 0.28, 0.34, 0.21]
    out = peers(Rounds({c.key: [s, s] for c, s in zip(configs, seconds)}), configs, configs[0])
    assert out["student"] == {"config": "openvino-cpu int8 default", "model": "student-int8", "p50_ms": pytest.approx(210)}
    assert out["vs_fastest_dense"]["config"] == "openvino-cpu int8 default"
    assert out["vs_fastest_dense"]["speedup"] == pytest.approx(0.45 / 0.21)
    assert out["measured_p50_ms"]["dense"] == {"torch-cpu fp32": pytest.approx(2600), "openvino-cpu default": pytest.approx(510),
                                               "openvino-cpu int8": pytest.approx(530),
                                               "openvino-cpu int8 default": pytest.approx(450)}


def test_every_onnx_runtime_session_has_the_same_options(tmp_path, tiny_unet):
    """One place configures ONNX Runtime: the bench's and runtime's backend and the checks' sessions alike
    do not spin idle threads, and use the same number of threads as the other CPU backends."""
    from deploykit.export import export_unet
    from deploykit.models.inputs import example_unet_inputs
    from deploykit.onnxtools import ort_session
    from deploykit.runtime import OnnxRuntimeBackend, cpu_threads

    path = tmp_path / "unet" / "model.onnx"
    export_unet(tiny_unet, path, example_unet_inputs(tiny_unet, 2))
    for session in (OnnxRuntimeBackend(path).session, ort_session(path)):
        options = session.get_session_options()
        assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
        assert options.get_session_config_entry("session.inter_op.allow_spinning") == "0"
        assert options.intra_op_num_threads == cpu_threads()


def test_the_machine_name_says_which_vector_isa_the_cpu_has():
    from deploykit.bench.machine import cpu_features

    # two parts both sold as "AMD EPYC": INT8 and bf16 figures differ between them
    assert cpu_features({"fpu", "sse4_2", "avx", "avx2", "fma"}) == ["AVX2"]
    assert cpu_features({"avx2", "avx512f", "avx512_vnni", "avx512_bf16"}) == ["AVX-512", "VNNI", "BF16"]
    assert cpu_features({"avx2", "avx_vnni"}) == ["AVX2", "AVX-VNNI"]
    assert cpu_features({"avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_int8"})[-1] == "AMX"
    assert cpu_features({"neon"}) == []
