"""Whole SD / SDXL pipelines to ONNX in optimum's layout, loaded back by optimum's ORT pipelines (offline)."""

from __future__ import annotations

import copy
import json
import os

import numpy as np
import onnx
import pytest
import torch

from deploykit.export import compare_with_torch, export_pipeline, export_unet
from deploykit.export import onnx as export_onnx
from deploykit.models.inputs import example_unet_inputs, unet_input_names
from deploykit.models.io_spec import unet_io
from deploykit.models.topologies import build_pipeline
from deploykit.models.wrappers import TensorOutput
from deploykit.onnxtools import cleanup, compare_onnx

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SIDE = 32  # image side in pixels for the tiny topologies (latent 16: their VAE downsamples by 2)
PROMPT = "a photo of a cat"
# ONNX Runtime vs torch, fp32: the whole pipeline agrees to ~4e-6 here (measured); fp16 graphs vs fp32
# graphs: ~1e-3 on the UNet output and the images (measured), checked at 2e-2.
FP32_ATOL, FP32_RTOL = 1e-4, 1e-3
FP16_ATOL, FP16_RTOL = 2e-2, 2e-2


def _narrow_unet(dense):
    """A stand-in for a pruned UNet: same inputs and conditioning, half the channels."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(5)
    config = {k: v for k, v in dense.config.items() if not k.startswith("_")}
    config["block_out_channels"] = [c // 2 for c in config["block_out_channels"]]
    return UNet2DConditionModel(**config).eval()


def _ort_pipeline(folder, cls_name: str):
    import onnxruntime as ort
    import optimum.onnxruntime as oo

    options = ort.SessionOptions()
    options.log_severity_level = 3
    # idle ONNX Runtime threads spin by default and starve torch on this 2-core machine
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return getattr(oo, cls_name).from_pretrained(folder, session_options=options)


def _run(pipe, output_type: str, height: int = SIDE, width: int = SIDE):
    out = pipe(PROMPT, num_inference_steps=2, guidance_scale=5.0, height=height, width=width, output_type=output_type,
               generator=torch.Generator().manual_seed(0))
    return np.asarray(out.images, dtype=np.float32)


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    """tiny-sd, exported with a narrower UNet passed as ``unet=`` (as a pruned student would be)."""
    pipe = build_pipeline("tiny-sd")
    student = _narrow_unet(pipe.unet)
    folder = tmp_path_factory.mktemp("sd") / "onnx"
    summary = export_pipeline(pipe, folder, unet=student)
    return {"pipe": pipe, "student": student, "folder": folder, "summary": summary}


@pytest.fixture(scope="module")
def sd_fp16(tmp_path_factory, sd):
    folder = tmp_path_factory.mktemp("sd16") / "onnx"
    return {"folder": folder, "summary": export_pipeline(sd["pipe"], folder, fp16=True, unet=sd["student"])}


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    pipe = build_pipeline("tiny-sdxl")
    folder = tmp_path_factory.mktemp("sdxl") / "onnx"
    return {"pipe": pipe, "folder": folder, "summary": export_pipeline(pipe, folder)}


def _files(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def _check_inputs(unet, batch=3, side=8, seed=1):
    feed = {n: x.numpy() for n, x in zip(unet_input_names(unet), example_unet_inputs(unet, batch, side, seed=seed))}
    feed["timestep"] = np.full((batch,), 421.5, np.float32)  # one (non-integer) timestep for the batch
    return [feed]


def _graph_io(path):
    graph = onnx.load(str(path), load_external_data=False).graph
    kind = {onnx.TensorProto.FLOAT: "f32", onnx.TensorProto.FLOAT16: "f16", onnx.TensorProto.INT64: "i64"}
    return ({i.name: kind[i.type.tensor_type.elem_type] for i in graph.input},
            {o.name: kind[o.type.tensor_type.elem_type] for o in graph.output})


# ------------------------------------------------------------------------------------------------
# layout


def test_sd_folder_has_optimums_layout_and_nothing_half_written(sd):
    folder = sd["folder"]
    tokenizer = ["tokenizer/merges.txt", "tokenizer/special_tokens_map.json", "tokenizer/tokenizer_config.json",
                 "tokenizer/vocab.json"]
    components = [f"{c}/{f}" for c in ("text_encoder", "unet", "vae_decoder", "vae_encoder") for f in ("config.json", "model.onnx")]
    assert _files(folder) == sorted(["model_index.json", "scheduler/scheduler_config.json", *tokenizer, *components])
    assert [p.name for p in folder.parent.iterdir()] == ["onnx"]  # no staging folder left beside it
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline" and index["unet"] == ["diffusers", "UNet2DConditionModel"]
    # the UNet passed in is the one exported, with its own config
    assert json.loads((folder / "unet/config.json").read_text())["block_out_channels"] == [16, 32]
    s = sd["summary"]
    assert s["precision"] == "fp32" and s["opset"] == 17 and set(s["components"]) == {"text_encoder", "unet", "vae_encoder",
                                                                                     "vae_decoder"}
    assert s["components"]["unet"]["files"]["unet/model.onnx"] == (folder / "unet/model.onnx").stat().st_size


def test_graph_io_follows_optimums_onnx_configs(sd, sdxl):
    """Names from optimum's own exporter configs; dtypes as optimum's exporter writes them (fp32 / int64)."""
    from optimum.exporters.onnx.model_configs import (
        CLIPTextOnnxConfig,
        CLIPTextWithProjectionOnnxConfig,
        UNetOnnxConfig,
        VaeDecoderOnnxConfig,
        VaeEncoderOnnxConfig,
    )
    from transformers import CLIPTextConfig

    for case, sdxl_kind in ((sd, False), (sdxl, True)):
        folder, pipe = case["folder"], case["pipe"]
        unet_in, unet_out = _graph_io(folder / "unet/model.onnx")
        expected = UNetOnnxConfig(pipe.unet.config, task="semantic-segmentation")
        assert list(unet_in) == list(expected.inputs) and list(unet_out) == list(expected.outputs)
        assert set(unet_in.values()) == {"f32"} and unet_out == {"out_sample": "f32"}
        assert onnx.load(str(folder / "unet/model.onnx")).graph.input[1].type.tensor_type.shape.dim == []  # scalar t
        for name, cfg_cls in (("text_encoder", CLIPTextOnnxConfig), ("text_encoder_2", CLIPTextWithProjectionOnnxConfig)):
            if name == "text_encoder_2" and not sdxl_kind:
                continue
            config = CLIPTextConfig.from_pretrained(folder / name)
            assert config.output_hidden_states is sdxl_kind
            ins, outs = _graph_io(folder / name / "model.onnx")
            expected = cfg_cls(config, task="feature-extraction")
            assert ins == {"input_ids": "i64"} and list(outs) == list(expected.outputs)
        for name, cfg_cls in (("vae_encoder", VaeEncoderOnnxConfig), ("vae_decoder", VaeDecoderOnnxConfig)):
            ins, outs = _graph_io(folder / name / "model.onnx")
            expected = cfg_cls(pipe.vae.config, task="semantic-segmentation")
            assert list(ins) == list(expected.inputs) and list(outs) == list(expected.outputs)


# ------------------------------------------------------------------------------------------------
# optimum loads and generates


def test_ort_sd_pipeline_generates_what_torch_generates(sd):
    from diffusers import StableDiffusionPipeline

    ort_pipe = _ort_pipeline(sd["folder"], "ORTStableDiffusionPipeline")
    image = _run(ort_pipe, "np", height=48, width=SIDE)  # non-square: the axes are dynamic
    assert image.shape == (1, 48, SIDE, 3) and np.isfinite(image).all()
    p = sd["pipe"]
    student = StableDiffusionPipeline(**{**p.components, "unet": sd["student"]})
    torch_latents, ort_latents = _run(student, "latent"), _run(ort_pipe, "latent")
    assert np.abs(torch_latents - ort_latents).max() < 1e-3
    assert np.abs(_run(p, "latent") - ort_latents).max() > 1e-2  # the dense UNet was not the one exported


def test_ort_sdxl_pipeline_generates_what_torch_generates(sdxl):
    ort_pipe = _ort_pipeline(sdxl["folder"], "ORTStableDiffusionXLPipeline")
    image = _run(ort_pipe, "np")
    assert image.shape == (1, SIDE, SIDE, 3) and np.isfinite(image).all()
    assert np.abs(_run(sdxl["pipe"], "latent") - _run(ort_pipe, "latent")).max() < 1e-3


# ------------------------------------------------------------------------------------------------
# UNet checks through polygraphy


def test_unet_onnx_matches_torch_and_a_changed_weight_fails(sd, sdxl):
    for unet, folder in ((sd["student"], sd["folder"]), (sdxl["pipe"].unet, sdxl["folder"])):
        path = folder / "unet/model.onnx"
        result = compare_with_torch(unet, path, _check_inputs(unet), atol=FP32_ATOL, rtol=FP32_RTOL)
        assert result["passed"] and result["max_abs_error"] < FP32_ATOL, result["message"]
        assert result["notes"] == []
        mixed = _check_inputs(unet)
        mixed[0]["timestep"] = np.array([10, 500, 999])  # int64, differing: the scalar graph takes the first
        result = compare_with_torch(unet, path, mixed, atol=FP32_ATOL, rtol=FP32_RTOL)
        assert result["passed"] and result["notes"], result
        changed = copy.deepcopy(unet)
        with torch.no_grad():
            changed.conv_out.weight.add_(0.05)
        result = compare_with_torch(changed, path, _check_inputs(unet), atol=FP32_ATOL, rtol=FP32_RTOL)
        assert not result["passed"] and result["worst_output"] == "out_sample"
        assert "FAILED" in result["message"] and "'out_sample'" in result["message"]


# ------------------------------------------------------------------------------------------------
# fp16


def _fp16_feeds(folder, name, unet):
    if name == "unet":
        return _check_inputs(unet)
    if name == "text_encoder":
        return [{"input_ids": np.random.default_rng(0).integers(0, 500, (2, 77)).astype(np.int64)}]
    rng = np.random.default_rng(0)
    if name == "vae_encoder":
        return [{"sample": rng.uniform(-1, 1, (1, 3, 16, 16)).astype(np.float32)}]
    return [{"latent_sample": rng.standard_normal((1, 4, 8, 8)).astype(np.float32)}]


def test_fp16_graphs_load_on_cpu_and_match_fp32(sd, sd_fp16):
    for name in ("text_encoder", "unet", "vae_encoder", "vae_decoder"):
        ref, half = sd["folder"] / name / "model.onnx", sd_fp16["folder"] / name / "model.onnx"
        result = compare_onnx(ref, half, _fp16_feeds(sd["folder"], name, sd["student"]), FP16_ATOL, FP16_RTOL)
        assert result["passed"], f"{name}: {result['message']}"
        ins, outs = _graph_io(half)
        assert set(outs.values()) == {"f16"}, name
        weights = {t.data_type for t in onnx.load(str(half)).graph.initializer if t.HasField("raw_data") and len(t.raw_data) > 1024}
        if name in ("unet", "text_encoder"):  # fp16 weights
            assert weights == {onnx.TensorProto.FLOAT16}, name
        if name == "unet":
            assert ins == {"sample": "f16", "timestep": "f32", "encoder_hidden_states": "f16"}
        if name.startswith("vae"):  # fp16 at the edges, fp32 inside
            assert set(ins.values()) == {"f16"} and weights == {onnx.TensorProto.FLOAT}
            assert json.loads((sd_fp16["folder"] / name / "config.json").read_text())["force_upcast"] is False


def test_fp16_unet_keeps_the_timestep_embedding_in_fp32(sd_fp16):
    model = cleanup.infer_shapes(onnx.load(str(sd_fp16["folder"] / "unet/model.onnx")))
    types = {v.name: v.type.tensor_type.elem_type for v in model.graph.value_info}
    types.update({i.name: i.type.tensor_type.elem_type for i in model.graph.input})
    producer = {o: n for n in model.graph.node for o in n.output}
    trig = [n for n in model.graph.node if n.op_type in ("Sin", "Cos")]
    assert trig
    # everything upstream of sin/cos, back to the timestep input, is fp32 (no fp16 round trip on the way);
    # shapes read from fp16 tensors (Shape nodes) are not values and do not count
    todo, seen = [n.input[0] for n in trig], set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        assert types.get(name) != onnx.TensorProto.FLOAT16, name
        node = producer.get(name)
        if node is not None and node.op_type != "Shape":
            todo.extend(node.input)
    assert "timestep" in seen
    matmuls = [n for n in model.graph.node if n.op_type in ("MatMul", "Gemm") and n.input[0] in types]
    assert matmuls and all(types[n.input[0]] == onnx.TensorProto.FLOAT16 for n in matmuls)


def test_fp16_ort_pipeline_generates_close_to_fp32(sd, sd_fp16):
    fp32 = _run(_ort_pipeline(sd["folder"], "ORTStableDiffusionPipeline"), "np")
    fp16 = _run(_ort_pipeline(sd_fp16["folder"], "ORTStableDiffusionPipeline"), "np")
    assert fp16.shape == (1, SIDE, SIDE, 3) and np.isfinite(fp16).all()
    assert np.abs(fp16 - fp32).max() < FP16_ATOL
    assert sd_fp16["summary"]["precision"] == "fp16"


# ------------------------------------------------------------------------------------------------
# large models, clean-up, atomic writes


def test_large_models_get_one_external_data_file(sd, tmp_path, monkeypatch):
    unet = sd["student"]
    monkeypatch.setattr(cleanup, "EXTERNAL_DATA_BYTES", 0)  # as if it were over 2 GB
    args = list(example_unet_inputs(unet, 2, 8))
    args[1] = args[1][0]
    path = export_unet(unet, tmp_path / "unet" / "model.onnx", args)
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.onnx", "model.onnx_data"]
    model = onnx.load(str(path), load_external_data=False)
    locations = {e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"}
    assert locations == {"model.onnx_data"}
    assert all(len(t.raw_data) <= cleanup.INLINE_TENSOR_BYTES for t in model.graph.initializer)  # weights: all outside
    result = compare_with_torch(unet, path, _check_inputs(unet), atol=FP32_ATOL, rtol=FP32_RTOL)
    assert result["passed"], result["message"]
    # clean-up in place works on the external-data layout too
    files = cleanup.clean_file(path)
    assert [f.name for f in files] == ["model.onnx", "model.onnx_data"]
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.onnx", "model.onnx_data"]
    assert compare_with_torch(unet, path, _check_inputs(unet), atol=FP32_ATOL, rtol=FP32_RTOL)["passed"]


def test_clean_up_folds_constants_and_infers_shapes(sd, tmp_path):
    unet = sd["student"]
    io = unet_io(unet)
    raw, weights = export_onnx.export_graph(TensorOutput(unet), io.export_inputs(example_unet_inputs(unet, 2, 8)),
                                            io.input_names(), io.output_names(), io.dynamic_axes(), 17, tmp_path)
    cleaned = cleanup.clean_model(raw)
    assert len(cleaned.graph.node) < 0.8 * len(raw.graph.node)
    assert not any(n.op_type == "Constant" for n in cleaned.graph.node)
    assert len(cleaned.graph.value_info) > 0.9 * len(cleaned.graph.node)  # shapes of (nearly) every tensor
    files = export_onnx.write_model(cleaned, weights, tmp_path, "clean.onnx")
    assert compare_with_torch(unet, files[0], _check_inputs(unet), atol=FP32_ATOL, rtol=FP32_RTOL)["passed"]


def test_a_failed_export_leaves_nothing_behind(sd, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    # export_unet into a folder that holds an earlier export: the earlier files stay as they were
    unet_dir = tmp_path / "unet"
    unet_dir.mkdir()
    (unet_dir / "model.onnx").write_bytes(b"earlier")
    monkeypatch.setattr(cleanup, "check_model", broken)
    args = list(example_unet_inputs(sd["student"], 1, 8))
    with pytest.raises(RuntimeError, match="disk full"):
        export_unet(sd["student"], unet_dir / "model.onnx", args)
    assert [p.name for p in unet_dir.iterdir()] == ["model.onnx"] and (unet_dir / "model.onnx").read_bytes() == b"earlier"

    # export_pipeline: no folder at all, and no staging folder beside it
    with pytest.raises(RuntimeError, match="disk full"):
        export_pipeline(sd["pipe"], tmp_path / "pipeline")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["unet"]


def test_export_pipeline_refuses_to_replace_a_foreign_folder(sd, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        export_pipeline(sd["pipe"], tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]
