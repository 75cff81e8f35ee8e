"""Optional INT8 post-training quantization, calibrated on the teacher's own sampling trajectories.

Two paths, one set of exclusions (:mod:`deploykit.quantize.exclude`) and one calibration set
(:mod:`deploykit.quantize.calibration`):

- CPU: :func:`deploykit.quantize.onnx_int8.quantize_onnx`, ONNX Runtime static quantization into a QDQ
  graph with per-channel weights;
- TensorRT: :func:`deploykit.quantize.modelopt_int8.quantize_modelopt` (modelopt INT8 SmoothQuant for
  linear layers, percentile calibration for convolutions) and
  :func:`deploykit.quantize.modelopt_int8.export_qdq_onnx` (the QDQ graph TensorRT builds INT8 engines from).

The algorithms take a model (or an ONNX file), a config and calibration inputs; they never read recipes
or artifacts.
"""

from deploykit.quantize.exclude import DEFAULT_EXCLUDE, is_excluded, onnx_node_module

__all__ = ["DEFAULT_EXCLUDE", "is_excluded", "onnx_node_module"]
