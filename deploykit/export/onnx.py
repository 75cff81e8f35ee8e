"""Export diffusers UNets (and any tensor-in, tensor-out module) to ONNX; check them against torch with polygraphy.

Files are written the way optimum writes them: ``model.onnx``, plus one ``model.onnx_data`` beside it
when the weights as written pass ~1.8 GB (protobuf's 2 GB limit; the SD1.5 UNet is 3.4 GB in fp32).
The file set appears at once: it is built in a staging folder and published by renaming
(:func:`deploykit.onnxtools.staged_folder`). Weights are never held twice: passes run on a skeleton
graph and the weights are streamed from the exporter's files into the final file
(:mod:`deploykit.onnxtools.cleanup`). Names, dynamic axes and sample inputs come from the model's
description (:mod:`deploykit.models.io_spec`).

Precision (``fp16=True``): the graph is exported in fp32, cleaned, then converted with ONNX Runtime's
float16 converter (weights and compute fp16, float inputs and outputs fp16), except a UNet's timestep
path (from ``timestep`` / ``time_ids`` up to the first MatMul/Gemm/Conv), which stays fp32 with those
inputs (:func:`deploykit.onnxtools.fp16.convert_fp16`). ``fp16="io"`` keeps all compute and weights
fp32 and only makes the float inputs/outputs fp16 (the VAE, whose activations overflow fp16 in SDXL).

ONNX Runtime's CPU provider has few fp16 kernels: it runs fp16 graphs by inserting casts, correctly but
slower than fp32. fp16 graphs are for GPUs and TensorRT.
"""

from __future__ import annotations

import shutil
import uuid
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from deploykit.models.io_spec import UNetIO, unet_io, unet_of
from deploykit.models.wrappers import TensorOutput
from deploykit.onnxtools import cleanup, compare_module, graph_signature, staged_folder
from deploykit.onnxtools.fp16 import cast_io_fp16, convert_fp16


def export_graph(module: nn.Module, args: Sequence[torch.Tensor], input_names: Sequence[str],
                 output_names: Sequence[str], dynamic_axes: dict, opset: int,
                 workdir: Path) -> tuple[onnx.ModelProto, cleanup.Weights]:
    """torch.onnx (TorchScript exporter) into ``workdir``; returns the graph as skeleton and its weights.

    The weights of a large model stay in the exporter's files under ``workdir`` until saved: keep
    ``workdir`` until :func:`write_model` has run.
    """
    raw = workdir / f"raw-{uuid.uuid4().hex[:8]}"
    raw.mkdir(parents=True)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        # The TorchScript exporter handles diffusers' data-dependent Python (timestep broadcasting,
        # shape-dependent upsampling) without graph breaks and matches torch to ~1e-6. Over 2 GB it
        # writes one file per weight into raw/; they are copied into one data file at the end.
        torch.onnx.export(module.eval(), tuple(args), str(raw / "model.onnx"), input_names=list(input_names),
                          output_names=list(output_names), dynamic_axes=dynamic_axes, opset_version=opset,
                          do_constant_folding=True, dynamo=False)
    return cleanup.load_skeleton(raw / "model.onnx")


def finish_model(model: onnx.ModelProto, weights: cleanup.Weights, fp16: bool | str = False, clean: bool = True,
                 fp32_inputs: Sequence[str] = ()) -> onnx.ModelProto:
    """Clean-up and precision conversion of an exported skeleton (see the module docstring)."""
    model = cleanup.clean_model(model, fold=clean)
    if fp16 == "io":
        model = cast_io_fp16(model, skip=set(weights.sources))
    elif fp16:
        model = convert_fp16(model, fp32_inputs=fp32_inputs)
    return model


def write_model(model: onnx.ModelProto, weights: cleanup.Weights, folder: Path, name: str = "model.onnx") -> list[Path]:
    """Save into ``folder`` (a staging folder) and check the file; returns the files written."""
    files = weights.save(model, folder / name)
    cleanup.check_model(files[0])
    return files


def export_module(module: nn.Module, args: Sequence[torch.Tensor], path: str | Path, input_names: Sequence[str],
                  output_names: Sequence[str], dynamic_axes: dict, opset: int = 17, fp16: bool | str = False,
                  clean: bool = True, fp32_inputs: Sequence[str] = ()) -> list[Path]:
    """Export ``module`` to ``path`` (plus ``<path>_data`` when large); the files appear only once complete."""
    path = Path(path)
    with staged_folder(path.parent) as staging:
        work = staging / ".work"
        model, weights = export_graph(module, args, input_names, output_names, dynamic_axes, opset, work)
        model = finish_model(model, weights, fp16=fp16, clean=clean, fp32_inputs=fp32_inputs)
        files = write_model(model, weights, staging, path.name)
        shutil.rmtree(work)
        names = [f.name for f in files]
    return [path.parent / n for n in names]


def unet_description(model: nn.Module, example_inputs: Sequence[torch.Tensor]) -> UNetIO:
    """The UNet as its export takes it: the timestep takes the example's form, a 0-d example giving a scalar
    input (optimum's layout: one timestep for the whole batch), a 1-d one a ``batch`` axis."""
    return unet_io(model, scalar_timestep=torch.as_tensor(example_inputs[1]).dim() == 0)


def export_unet(model: nn.Module, path: str | Path, example_inputs: Sequence[torch.Tensor], opset: int = 17,
                fp16: bool = False, clean: bool = True) -> Path:
    """Write a UNet (UNet2DModel or UNet2DConditionModel, SD or SDXL) as ONNX at ``path``.

    Inputs, outputs, dtypes and dynamic axes are those of its description (:func:`deploykit.models.io_spec.unet_io`;
    the timestep's form follows ``example_inputs``, see :func:`unet_description`), fed positionally in that
    order. Large models get ``<path>_data`` beside ``path``. Returns ``path``; it appears only once complete.
    """
    io = unet_description(model, example_inputs)
    export_module(TensorOutput(unet_of(model)).eval(), io.export_inputs(example_inputs), path, io.input_names(),
                  io.output_names(), io.dynamic_axes(), opset=opset, fp16=fp16, clean=clean, fp32_inputs=io.fp32_inputs)
    return Path(path)


def compare_with_torch(model: nn.Module, onnx_path: str | Path, inputs: list[dict[str, np.ndarray]],
                       atol: float, rtol: float) -> dict:
    """Run a torch UNet and its ONNX export on the same inputs through polygraphy's Comparator.

    Works for UNet2DModel (``sample``, ``timestep``) and SD / SDXL UNet2DConditionModel (plus
    ``encoder_hidden_states``, ``text_embeds``, ``time_ids``); each input dict is cast to the graph's
    dtypes (an fp16 graph is compared against the fp32 torch model) and ranks (a scalar-timestep graph
    takes each batch's first timestep, for torch too; see ``notes``). Returns ``{"passed",
    "max_abs_error", "max_rel_error", "worst_output", "message", "notes", "atol", "rtol", "iterations", ...}``.
    """
    io = unet_io(model)
    names = list(io.input_names())
    signature = graph_signature(onnx_path)
    if list(signature) != names:
        raise ValueError(f"{onnx_path} takes inputs {list(signature)}, the model {names}")
    return compare_module(TensorOutput(unet_of(model)).eval(), onnx_path, inputs, atol, rtol, io.output_names())
