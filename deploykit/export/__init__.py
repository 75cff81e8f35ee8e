"""ONNX export (UNets, whole SD / SDXL pipelines in optimum's layout), clean-up, and checks against torch."""

from deploykit.export.onnx import compare_onnx, compare_with_torch, export_unet
from deploykit.export.pipeline import export_pipeline

__all__ = ["compare_onnx", "compare_with_torch", "export_pipeline", "export_unet"]
