"""Backends that evaluate a UNet: one call signature, ``(sample, timesteps) -> predicted noise``.

Names follow the report: ``torch-cpu``, ``onnxruntime-cpu`` (``torch-cuda``, ``onnxruntime-cuda``
and ``tensorrt`` plug in the same way where their hardware exists).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import nn


def cpu_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


class TorchBackend:
    def __init__(self, model: nn.Module, device: str = "cpu"):
        self.name = f"torch-{device}"
        self.device = device
        self.model = model.to(device).eval()

    @torch.no_grad()
    def __call__(self, sample: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return self.model(sample.to(self.device), timesteps.to(self.device)).sample


class OnnxRuntimeBackend:
    def __init__(self, onnx_path: str | Path, providers: list[str] | None = None, threads: int | None = None):
        import onnxruntime as ort

        providers = providers or ["CPUExecutionProvider"]
        self.name = "onnxruntime-cpu" if providers == ["CPUExecutionProvider"] else "onnxruntime-cuda"
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads or cpu_threads()
        self.session = ort.InferenceSession(str(onnx_path), options, providers=providers)
        self.input_names = [i.name for i in self.session.get_inputs()]

    def run_numpy(self, sample: np.ndarray, timesteps: np.ndarray) -> np.ndarray:
        return self.session.run(None, dict(zip(self.input_names, (sample, timesteps))))[0]

    def __call__(self, sample: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        out = self.run_numpy(sample.numpy().astype(np.float32), timesteps.numpy().astype(np.int64))
        return torch.from_numpy(out)
