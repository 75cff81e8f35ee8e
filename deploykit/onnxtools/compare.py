"""Comparisons of ONNX graphs against torch and against each other, through polygraphy's Comparator."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from deploykit.onnxtools.session import ort_runner
from deploykit.onnxtools.signature import adapt_feed, graph_signature


def compare_runners(runners: list, inputs: list[dict[str, np.ndarray]], atol: float, rtol: float) -> dict:
    """Polygraphy comparison of two runners; the worst output (largest max |diff|) is named in ``message``.

    Returns ``{"passed", "max_abs_error", "max_rel_error", "worst_output", "outputs", "message", "atol",
    "rtol", "iterations"}``, ``outputs`` holding per-output ``max_abs_error`` / ``max_rel_error`` / ``passed``.
    The relative error is taken against the first runner (the reference).
    """
    from polygraphy.comparator import Comparator, SimpleCompareFunc
    from polygraphy.logger import G_LOGGER

    with G_LOGGER.verbosity(G_LOGGER.CRITICAL):
        results = Comparator.run(runners, data_loader=inputs)
        accuracy = Comparator.compare_accuracy(results, compare_func=SimpleCompareFunc(atol=atol, rtol=rtol))
    (_, ref_iters), (_, test_iters) = results[0], results[1]
    per_output: dict[str, dict] = {}
    for it, (a, b) in enumerate(zip(ref_iters, test_iters)):
        for name in a.keys():
            x = np.asarray(a[name], dtype=np.float64)
            y = np.asarray(b[name], dtype=np.float64)
            diff = np.abs(x - y)
            finite = bool(np.isfinite(y).all())
            abs_err = float(diff.max()) if diff.size else 0.0
            rel_err = float((diff / (np.abs(x) + 1e-6)).max()) if diff.size else 0.0
            if not finite:
                abs_err = rel_err = float("inf")
            ok = bool(finite and np.all((diff <= atol) | (diff <= rtol * np.abs(x))))
            entry = per_output.setdefault(name, {"max_abs_error": 0.0, "max_rel_error": 0.0, "passed": True,
                                                 "worst_iteration": 0})
            if abs_err > entry["max_abs_error"]:
                entry["max_abs_error"], entry["worst_iteration"] = abs_err, it
            entry["max_rel_error"] = max(entry["max_rel_error"], rel_err)
            entry["passed"] = entry["passed"] and ok
    passed = bool(accuracy) and all(e["passed"] for e in per_output.values())
    worst = max(per_output, key=lambda n: (not per_output[n]["passed"], per_output[n]["max_abs_error"]))
    w = per_output[worst]
    message = (f"{'passed' if passed else 'FAILED'}: worst output {worst!r} max |diff| {w['max_abs_error']:.3g}, "
               f"max rel {w['max_rel_error']:.3g} (iteration {w['worst_iteration']}; atol {atol:g}, rtol {rtol:g}; "
               f"{runners[0].name} vs {runners[1].name})")
    return {"passed": passed, "max_abs_error": max(e["max_abs_error"] for e in per_output.values()),
            "max_rel_error": max(e["max_rel_error"] for e in per_output.values()), "worst_output": worst,
            "outputs": per_output, "message": message, "atol": atol, "rtol": rtol, "iterations": len(inputs)}


def compare_module(module: nn.Module, onnx_path: str | Path, inputs: list[dict[str, np.ndarray]], atol: float,
                   rtol: float, output_names: Sequence[str] | None = None) -> dict:
    """torch ``module`` (positional inputs in the graph's input order) vs the ONNX file in ONNX Runtime.

    Each input dict is cast to the graph's dtypes (an fp16 graph is compared against the fp32 module)
    and ranks (a scalar input takes each batch's first value, for torch too; see ``notes``).
    """
    from deploykit.onnxtools.torch_runner import TorchRunner

    signature = graph_signature(onnx_path)
    if output_names is None:
        graph = onnx.load(str(onnx_path), load_external_data=False).graph
        output_names = [o.name for o in graph.output]
    dtype = next((p.dtype for p in module.parameters()), torch.float32)
    notes: set[str] = set()
    feeds = [adapt_feed(f, signature, notes) for f in inputs]
    runners = [TorchRunner(module.eval(), signature, list(output_names), float_dtype=dtype), ort_runner(onnx_path)]
    return {**compare_runners(runners, feeds, atol, rtol), "notes": sorted(notes)}


def compare_onnx(reference_path: str | Path, onnx_path: str | Path, inputs: list[dict[str, np.ndarray]],
                 atol: float, rtol: float) -> dict:
    """Two ONNX files with the same inputs and outputs (fp32 reference vs fp16, say) in ONNX Runtime CPU."""
    from polygraphy.backend.base import BaseRunner

    ref_sig, sig = graph_signature(reference_path), graph_signature(onnx_path)

    class _Casting(BaseRunner):  # feeds each runner its own dtypes
        def __init__(self, inner, signature):
            super().__init__(name=inner.name, prefix="casting")
            self.inner, self.signature = inner, signature

        def activate_impl(self):
            self.inner.activate()

        def get_input_metadata_impl(self):
            return self.inner.get_input_metadata(use_numpy_dtypes=False)

        def infer(self, feed_dict, check_inputs=True, *args, **kwargs):
            return super().infer(feed_dict, False, *args, **kwargs)

        def infer_impl(self, feed_dict):
            out = self.inner.infer(adapt_feed(feed_dict, self.signature), check_inputs=False)
            self.inference_time = self.inner.inference_time
            return out

        def deactivate_impl(self):
            self.inner.deactivate()

    runners = [_Casting(ort_runner(reference_path, "reference"), ref_sig), _Casting(ort_runner(onnx_path, "onnx"), sig)]
    notes: set[str] = set()
    feeds = [adapt_feed(f, ref_sig, notes) for f in inputs]
    return {**compare_runners(runners, feeds, atol, rtol), "notes": sorted(notes)}
