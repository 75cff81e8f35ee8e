"""OpenVINO on the CPU: the exported ONNX graphs (fp32, or the quantize stage's INT8 QDQ graphs) read directly.

OpenVINO is an optional extra (``pip install 'deploykit[openvino]'``). Settings match the other
CPU backends: the same number of threads (``INFERENCE_NUM_THREADS``), one stream tuned for latency
(``PERFORMANCE_HINT: LATENCY``), and float layers computed in fp32 (``INFERENCE_PRECISION_HINT: f32``):
on CPUs with bf16 instructions (this project's AMD EPYC, Intel Xeons with AMX) OpenVINO's default
would run them in bf16, and an "fp32" figure would not be one. An INT8 QDQ graph still runs its
quantized layers in INT8.

Compiling an SD1.5 UNet takes a while, so the runtime keeps compiled models in a cache folder
outside the artifact (:func:`cache_folder`): an artifact's manifest lists every file it holds, and a
cache inside it would be an unlisted file. The folder is named after the sha256 of the graph's files,
as the manifest records them, so a changed graph never meets a stale compiled model.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from deploykit.errors import InputError
from deploykit.runtime.backends import GraphBackend, cpu_threads

INSTALL_HINT = "pip install 'deploykit[openvino]'"
CACHE_ENV = "DEPLOYKIT_CACHE_DIR"


def openvino_missing() -> str | None:
    """None where OpenVINO can be imported; otherwise what to install, in words."""
    try:
        import openvino  # noqa: F401
    except ImportError:
        return f"openvino is not installed ({INSTALL_HINT})"
    return None


def cache_folder(digests: list[str]) -> Path:
    """Where the compiled model of a graph whose files have these sha256 digests is kept:
    ``$DEPLOYKIT_CACHE_DIR/openvino/<key>``, by default under ``$XDG_CACHE_HOME`` or ``~/.cache/deploykit``."""
    base = os.environ.get(CACHE_ENV) or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "deploykit"
    key = hashlib.sha256("\n".join(sorted(digests)).encode()).hexdigest()[:32]
    return Path(base) / "openvino" / key


def compile_config(threads: int | None = None, precision: str | None = "f32") -> dict:
    """``precision``: the float layers' inference precision; None leaves OpenVINO's default for this CPU."""
    config = {"INFERENCE_NUM_THREADS": threads or cpu_threads(), "PERFORMANCE_HINT": "LATENCY"}
    return config | ({"INFERENCE_PRECISION_HINT": precision} if precision else {})


class OpenVINOBackend(GraphBackend):
    name = "openvino-cpu"

    def __init__(self, onnx_path: str | Path, threads: int | None = None, cache_dir: str | Path | None = None,
                 precision: str | None = "f32"):
        missing = openvino_missing()
        if missing:
            raise InputError(f"backend openvino-cpu: {missing}")
        import openvino as ov

        core = ov.Core()
        if cache_dir is not None:
            Path(cache_dir).mkdir(parents=True, exist_ok=True)
            core.set_property({"CACHE_DIR": str(cache_dir)})
        # compiled from the path, so that a cached model is imported without reading the graph first
        self.compiled = core.compile_model(str(onnx_path), "CPU", compile_config(threads, precision))
        self.precision = self.compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()  # "f32", "bf16"
        self.request = self.compiled.create_infer_request()
        self.inputs = [(port.get_any_name(), port.get_element_type().to_dtype().type, port.get_partial_shape().rank.get_length())
                       for port in self.compiled.inputs]

    def run_numpy(self, *inputs: np.ndarray) -> np.ndarray:
        self.request.infer(self.feed(*inputs))
        # the request's output tensor is overwritten by the next call
        return self.request.get_output_tensor(0).data.copy()
