"""Export a whole Stable Diffusion / SDXL pipeline to ONNX in optimum's folder layout.

``optimum.onnxruntime.ORTStableDiffusionPipeline.from_pretrained(folder)`` (``ORTStableDiffusionXLPipeline``
for SDXL, or ``ORTDiffusionPipeline`` for either) loads the result offline::

    folder/
      model_index.json                 the diffusers pipeline config (class, component classes)
      scheduler/scheduler_config.json
      tokenizer/  [tokenizer_2/]       vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json
      text_encoder/   model.onnx  config.json    in: input_ids (int64 [batch, sequence])
                                                 out: last_hidden_state, pooler_output[, hidden_states.0..N (SDXL)]
      [text_encoder_2/ model.onnx config.json]   out: text_embeds, last_hidden_state, hidden_states.0..N
      unet/           model.onnx [model.onnx_data] config.json
                                                 in: sample [batch, 4, h, w], timestep (scalar, float),
                                                     encoder_hidden_states [batch, sequence, D]
                                                     [, text_embeds [batch, P], time_ids [batch, 6] (SDXL)]
                                                 out: out_sample
      vae_encoder/    model.onnx  config.json    in: sample [batch, 3, H, W]; out: latent_parameters
      vae_decoder/    model.onnx  config.json    in: latent_sample; out: sample

The names, orders and dtypes are those of optimum's own exporter (``optimum.exporters.onnx``: CLIP text
configs, ``UNetOnnxConfig``, ``VaeEncoderOnnxConfig``, ``VaeDecoderOnnxConfig``), which its ORT
wrappers feed; the export itself is ours (TorchScript exporter, clean-up, fp16 conversion), so a
pruned UNet instance exports the same way as a dense one. The folder appears whole: it is built in a
hidden sibling and renamed into place.

fp16 (``fp16=True``): text encoders and UNet fp16 (weights, compute, float I/O), the UNet's timestep
embedding path and its ``timestep`` / ``time_ids`` inputs fp32; both VAE graphs compute in fp32 with
fp16 inputs/outputs (the SDXL VAE overflows fp16; the VAE configs get ``force_upcast: false`` since the
upcast is inside the graph).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import time
import uuid
from pathlib import Path

import onnx
import torch
from torch import nn

from deploykit.export.onnx import export_graph, finish_model, write_model
from deploykit.models.io_spec import CLIPTextIO, is_conditional, pipeline_component_io, sample_size
from deploykit.models.wrappers import TensorOutput

ONNX_NAME = "model.onnx"
COMPONENTS = ("text_encoder", "text_encoder_2", "unet", "vae_encoder", "vae_decoder")
_ELEM = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float16", onnx.TensorProto.INT64: "int64",
         onnx.TensorProto.INT32: "int32"}


class TextEncoderOutputs(nn.Module):
    """A CLIP text model as optimum exports it: ``input_ids`` in, a flat tuple of tensors out (``io``'s outputs)."""

    def __init__(self, model: nn.Module, io: CLIPTextIO):
        super().__init__()
        self.model, self.hidden_states, self.with_projection = model, io.hidden_states, io.with_projection

    def forward(self, input_ids: torch.Tensor):
        out = self.model(input_ids=input_ids, output_hidden_states=self.hidden_states, return_dict=True)
        first = (out.text_embeds, out.last_hidden_state) if self.with_projection else (out.last_hidden_state,
                                                                                         out.pooler_output)
        return first + (tuple(out.hidden_states) if self.hidden_states else ())


class VaeEncoderOutputs(nn.Module):
    """``sample`` -> ``latent_parameters`` (mean and log-variance, as optimum's ORTVaeEncoder expects)."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, sample: torch.Tensor) -> torch.Tensor:
        return self.vae.encode(sample).latent_dist.parameters


class VaeDecoderOutputs(nn.Module):
    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, latent_sample: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latent_sample).sample


def is_sdxl(pipeline) -> bool:
    return getattr(pipeline, "text_encoder_2", None) is not None


def _example_latent_side(unet) -> int:
    """A small latent side for tracing; every axis is dynamic, and a multiple of 2**levels keeps diffusers'
    up-sampling on its shape-independent path."""
    step = 2 ** len(unet.config.block_out_channels)
    return max(step, min(sample_size(unet), 32) // step * step)


def _component_specs(pipeline, unet, sdxl: bool, fp16: bool):
    """(name, module, example args, description, precision) per component."""
    tokenizer = pipeline.tokenizer
    ids = tokenizer(["a photo of a cat", ""], padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids
    specs = []
    for name in ("text_encoder", "text_encoder_2"):
        encoder = getattr(pipeline, name, None)
        if encoder is None:
            continue
        text_io = pipeline_component_io(name, encoder.config, sdxl)
        specs.append((name, TextEncoderOutputs(encoder, text_io), (ids,), text_io, fp16))

    vae = pipeline.vae
    vae_decoder, vae_encoder = (pipeline_component_io(n, vae.config, sdxl) for n in ("vae_decoder", "vae_encoder"))
    scale = vae_decoder.scale_factor
    side = _example_latent_side(unet)
    unet_io = pipeline_component_io("unet", unet.config, sdxl)
    example = unet_io.sample_input(2, side, image_side=side * scale)
    specs.append(("unet", TensorOutput(unet), unet_io.export_inputs(example), unet_io, fp16))

    gen = torch.Generator().manual_seed(0)
    latent = torch.randn(1, vae.config.latent_channels, side, side, generator=gen)
    image = torch.randn(1, vae.config.in_channels, side * scale, side * scale, generator=gen)
    vae_precision = "io" if fp16 else False
    specs.append(("vae_encoder", VaeEncoderOutputs(vae), (image,), vae_encoder, vae_precision))
    specs.append(("vae_decoder", VaeDecoderOutputs(vae), (latent,), vae_decoder, vae_precision))
    return specs


def _save_component_config(name: str, pipeline, unet, folder: Path, fp16: bool) -> None:
    if name.startswith("text_encoder"):
        config = copy.deepcopy(getattr(pipeline, name).config)
        config.output_hidden_states = is_sdxl(pipeline)  # what the graph outputs, as optimum records it
        config.save_pretrained(folder)
    elif name == "unet":
        unet.save_config(folder)
    else:
        pipeline.vae.save_config(folder)
        if fp16:
            # The graph already runs in fp32 inside; without this SDXL's pipeline would try to upcast
            # the ORT VAE object itself (and fail).
            path = folder / "config.json"
            config = json.loads(path.read_text())
            config["force_upcast"] = False
            path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _io(model_path: Path) -> dict:
    graph = onnx.load(str(model_path), load_external_data=False).graph

    def describe(values):
        return {v.name: [_ELEM.get(v.type.tensor_type.elem_type, str(v.type.tensor_type.elem_type)),
                         [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]] for v in values}
    return {"inputs": describe(graph.input), "outputs": describe(graph.output)}


def _replaceable(folder: Path) -> bool:
    """Whether ``folder`` holds something (an earlier export, which we may replace; anything else raises)."""
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        if not (folder / "model_index.json").is_file():
            raise FileExistsError(f"{folder} exists and is not an exported pipeline; refusing to replace it")
        return True
    return False


def _publish(staging: Path, folder: Path) -> None:
    """Put the finished staging folder at ``folder``: one rename, or a swap with an earlier export."""
    if _replaceable(folder):
        old = folder.parent / f".{folder.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(folder, old)
        os.replace(staging, folder)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, folder)  # rename(2) onto an absent or empty directory


def export_pipeline(pipeline, folder: str | Path, fp16: bool = False, opset: int = 17, unet: nn.Module | None = None,
                    clean: bool = True) -> dict:
    """Export ``pipeline`` (diffusers StableDiffusionPipeline or StableDiffusionXLPipeline) to ``folder``.

    ``unet`` replaces ``pipeline.unet`` (a pruned UNet: same config, smaller internal widths; its own
    config is saved). ``fp16``: see the module docstring. Returns a summary: ``{"folder", "pipeline",
    "opset", "precision", "seconds", "total_bytes", "components": {name: {"files": {relative path:
    bytes}, "inputs", "outputs", "precision", "seconds"}}}``.
    """
    started = time.perf_counter()
    folder = Path(folder)
    unet = unet if unet is not None else pipeline.unet
    if not is_conditional(unet):
        raise ValueError(f"{type(unet).__name__} is not a text-conditioned UNet; export it with export_unet")
    sdxl = is_sdxl(pipeline)
    _replaceable(folder)  # fail before the work, not after
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = folder.parent / f".{folder.name}.tmp-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    summary: dict = {"folder": str(folder), "pipeline": type(pipeline).__name__, "opset": opset,
                     "precision": "fp16" if fp16 else "fp32", "components": {}}
    modules = [pipeline.vae, unet] + [getattr(pipeline, n) for n in ("text_encoder", "text_encoder_2")
                                      if getattr(pipeline, n, None) is not None]
    training = [m.training for m in modules]
    try:
        for m in modules:
            m.eval()
        for name, module, args, io, precision in _component_specs(pipeline, unet, sdxl, fp16):
            t0 = time.perf_counter()
            sub = staging / name
            sub.mkdir()
            model, weights = export_graph(module, args, io.input_names(), io.output_names(), io.dynamic_axes(), opset,
                                          staging / ".work")
            model = finish_model(model, weights, fp16=precision, clean=clean, fp32_inputs=io.fp32_inputs)
            write_model(model, weights, sub, ONNX_NAME)
            del model, weights
            shutil.rmtree(staging / ".work")
            _save_component_config(name, pipeline, unet, sub, fp16)
            summary["components"][name] = {
                **_io(sub / ONNX_NAME), "seconds": round(time.perf_counter() - t0, 2),
                "precision": {"io": "fp32 compute, fp16 I/O", False: "fp32", True: "fp16"}[precision],
                "files": {f"{name}/{f.name}": f.stat().st_size for f in sorted(sub.iterdir())}}
        pipeline.scheduler.save_pretrained(staging / "scheduler")
        pipeline.tokenizer.save_pretrained(staging / "tokenizer")
        if sdxl:
            pipeline.tokenizer_2.save_pretrained(staging / "tokenizer_2")
        pipeline.save_config(staging)  # model_index.json
        _publish(staging, folder)
    finally:
        for m, was in zip(modules, training):
            m.train(was)
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    summary["total_bytes"] = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    summary["seconds"] = round(time.perf_counter() - started, 2)
    return summary
