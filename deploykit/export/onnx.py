"""Export a diffusers UNet to ONNX and check it against torch with polygraphy."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from deploykit.models.wrappers import TensorOutput

INPUT_NAMES = ("sample", "timestep")
OUTPUT_NAMES = ("out_sample",)


def export_unet(model: nn.Module, path: str | Path, example_inputs: Sequence[torch.Tensor], opset: int = 17) -> Path:
    """Write ``model`` as ONNX with a dynamic batch axis; the file appears only once complete."""
    import onnx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    wrapper = TensorOutput(model.eval())
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        # The TorchScript exporter handles diffusers' data-dependent Python (timestep broadcasting)
        # without graph breaks and matches torch to ~1e-6 here.
        torch.onnx.export(
            wrapper, tuple(example_inputs), str(tmp), input_names=list(INPUT_NAMES), output_names=list(OUTPUT_NAMES),
            dynamic_axes={"sample": {0: "batch"}, "timestep": {0: "batch"}, "out_sample": {0: "batch"}},
            opset_version=opset, do_constant_folding=True, dynamo=False,
        )
    proto = onnx.load(str(tmp))
    onnx.checker.check_model(proto)
    proto = onnx.shape_inference.infer_shapes(proto)
    onnx.save(proto, str(tmp))
    tmp.replace(path)
    return path


def compare_with_torch(model: nn.Module, onnx_path: str | Path, inputs: list[dict[str, np.ndarray]],
                       atol: float, rtol: float) -> dict:
    """Run torch and ONNX Runtime on the same inputs through polygraphy's Comparator.

    Returns ``{"passed", "max_abs_error", "max_rel_error", "atol", "rtol", "iterations"}``.
    """
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
    from polygraphy.comparator import Comparator, SimpleCompareFunc
    from polygraphy.logger import G_LOGGER

    from deploykit.export.torch_runner import TorchRunner

    channels, height, width = inputs[0]["sample"].shape[1:]
    signature = {"sample": (np.float32, ["batch", channels, height, width]), "timestep": (np.int64, ["batch"])}
    runners = [TorchRunner(TensorOutput(model.eval()), signature, list(OUTPUT_NAMES)),
               OnnxrtRunner(SessionFromOnnx(str(onnx_path), providers=["CPUExecutionProvider"]))]
    with G_LOGGER.verbosity(G_LOGGER.CRITICAL):
        results = Comparator.run(runners, data_loader=inputs)
        accuracy = Comparator.compare_accuracy(results, compare_func=SimpleCompareFunc(atol=atol, rtol=rtol))
    max_abs = max_rel = 0.0
    (_, torch_iters), (_, ort_iters) = results[0], results[1]
    for a, b in zip(torch_iters, ort_iters):
        x, y = np.asarray(a[OUTPUT_NAMES[0]]), np.asarray(b[OUTPUT_NAMES[0]])
        diff = np.abs(x - y)
        max_abs = max(max_abs, float(diff.max()))
        max_rel = max(max_rel, float((diff / (np.abs(x) + 1e-6)).max()))
    return {"passed": bool(accuracy), "max_abs_error": max_abs, "max_rel_error": max_rel,
            "atol": atol, "rtol": rtol, "iterations": len(inputs)}
