"""torch -> ONNX: UNets alone, and whole SD / SDXL pipelines in optimum's layout, each checked against torch.

Graph tools (clean-up, fp16, signatures, comparisons) are in :mod:`deploykit.onnxtools`; TensorRT engines
in :mod:`deploykit.engines`; the Jetson bundle in :mod:`deploykit.device`."""

from deploykit.export.onnx import compare_with_torch, export_unet
from deploykit.export.optimum_layout import export_pipeline

__all__ = ["compare_with_torch", "export_pipeline", "export_unet"]
