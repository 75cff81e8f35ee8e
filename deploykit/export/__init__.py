"""ONNX export and its check against torch."""

from deploykit.export.onnx import compare_with_torch, export_unet

__all__ = ["compare_with_torch", "export_unet"]
