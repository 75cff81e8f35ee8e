"""Inference engines built from exported ONNX graphs: TensorRT (:mod:`deploykit.engines.tensorrt`)."""
