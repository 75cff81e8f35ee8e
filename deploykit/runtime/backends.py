"""Backends that evaluate a model: one call signature, ``(*inputs) -> first output``.

For a UNet the inputs are positional, in the order of its description (:mod:`deploykit.models.io_spec`):
``sample``, ``timestep``, and for SD UNets ``encoder_hidden_states``, for SDXL ``text_embeds``, ``time_ids``.
Names follow the report: ``torch-cpu``, ``torch-cuda``, ``onnxruntime-cpu``, ``onnxruntime-cuda``,
``openvino-cpu`` (``tensorrt`` plugs in the same way where it is installed). The ONNX backends
(:func:`onnx_backend`) read the same exported graphs, fp32 or INT8 QDQ.

Every CPU backend uses the same number of threads (:func:`cpu_threads`), and ONNX Runtime sessions
are configured in one place (:func:`ort_session_options`), for the bench, the runtime, eval and the
checks alike.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from deploykit.models.wrappers import tensor_view

_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
              "tensor(int64)": np.int64, "tensor(int32)": np.int32}


def cpu_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


class TorchBackend:
    """A torch UNet on ``device`` in ``dtype``; ``compile=True`` runs it through ``torch.compile`` in ``compile_mode``.

    Calls on CUDA return after the device finished, so that wall-clock timing of a call is honest.
    ``compile_mode="reduce-overhead"`` replays CUDA graphs: at batch 2 an SD UNet's eager step is
    bound by kernel launches, not by the GPU's arithmetic.
    """

    def __init__(self, model: nn.Module, device: str = "cpu", dtype: torch.dtype = torch.float32, compile: bool = False,
                 compile_mode: str = "default"):
        self.name = f"torch-{device.split(':')[0]}"
        self.device, self.dtype = device, dtype
        self.model = tensor_view(model).eval()
        # A model already in place is left alone: semi-structured (2:4) weights cannot be moved or cast
        if any(p.device.type != torch.device(device).type or (p.is_floating_point() and p.dtype != dtype)
               for p in self.model.parameters()):
            self.model = self.model.to(device=device, dtype=dtype)
        self.forward = torch.compile(self.model, mode=compile_mode) if compile else self.model

    @torch.no_grad()
    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        moved = [x.to(self.device, self.dtype if x.is_floating_point() else x.dtype) for x in inputs]
        out = self.forward(*moved)
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
        return out


def ort_session_options(threads: int | None = None, quiet: bool = False):
    """ONNX Runtime session options, the one place they are made.

    Idle threads do not spin (intra- and inter-op): ONNX Runtime's default spinning keeps every
    session's pool busy-waiting after a call, so with several sessions timed round-robin (fp32 and
    INT8, teacher and student) the idle ones take cores from the one being timed, and torch or
    OpenVINO running beside it lose them too (benchmarks/results/ort_spinning.md measures it).
    ``quiet``: log errors only (the graph optimisers warn a lot on diffusers graphs).
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads or cpu_threads()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    if quiet:
        options.log_severity_level = 3
    return options


class GraphBackend:
    """An ONNX graph in some runtime: numpy feeds built from the graph's own input names and types."""

    name: str
    inputs: list[tuple[str, type, int]]  # (name, numpy dtype, rank)

    def feed(self, *inputs: np.ndarray) -> dict[str, np.ndarray]:
        feed = {}
        for (name, dtype, rank), x in zip(self.inputs, inputs):
            x = np.asarray(x)
            if rank == 0 and x.ndim == 1:  # optimum's SD UNets take one timestep for the whole batch
                x = x[0]
            feed[name] = np.array(x, dtype=dtype)
        return feed

    def run_numpy(self, *inputs: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.run_numpy(*(x.numpy() for x in inputs)).astype(np.float32, copy=False))


class OnnxRuntimeBackend(GraphBackend):
    def __init__(self, onnx_path: str | Path, providers: list[str] | None = None, threads: int | None = None,
                 options=None):
        """``options``: session options in place of :func:`ort_session_options` (for experiments on them)."""
        import onnxruntime as ort

        providers = providers or ["CPUExecutionProvider"]
        self.name = "onnxruntime-cpu" if providers == ["CPUExecutionProvider"] else "onnxruntime-cuda"
        self.session = ort.InferenceSession(str(onnx_path), options or ort_session_options(threads), providers=providers)
        self.inputs = [(i.name, _ORT_TYPES.get(i.type, np.float32), len(i.shape)) for i in self.session.get_inputs()]

    def run_numpy(self, *inputs: np.ndarray) -> np.ndarray:
        return self.session.run(None, self.feed(*inputs))[0]


ONNX_BACKENDS = ("onnxruntime-cpu", "onnxruntime-cuda", "openvino-cpu")


def onnx_backend(name: str, onnx_path: str | Path, cache_dir: str | Path | None = None) -> GraphBackend:
    """The ONNX graph at ``onnx_path`` on backend ``name`` (one of :data:`ONNX_BACKENDS`); ``cache_dir``:
    where OpenVINO keeps the compiled model (None: compiled anew)."""
    if name == "openvino-cpu":
        from deploykit.runtime.openvino import OpenVINOBackend

        return OpenVINOBackend(onnx_path, cache_dir=cache_dir)
    if name not in ONNX_BACKENDS:
        raise ValueError(f"{name} does not run ONNX graphs (known: {', '.join(ONNX_BACKENDS)})")
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if name == "onnxruntime-cuda" else ["CPUExecutionProvider"]
    return OnnxRuntimeBackend(onnx_path, providers)
