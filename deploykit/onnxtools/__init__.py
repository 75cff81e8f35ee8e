"""Tools for ONNX graphs, whoever made them: clean-up and folding over 2 GB, fp16 conversion, signatures and
feeds, ONNX Runtime sessions, comparisons through polygraphy, and publishing a file set atomically.

Used by export (torch -> ONNX), quantize (INT8 QDQ graphs), the engine, bundle and verify stages."""

from deploykit.onnxtools.compare import compare_module, compare_onnx, compare_runners
from deploykit.onnxtools.session import ort_runner, ort_session
from deploykit.onnxtools.signature import adapt_feed, graph_signature
from deploykit.onnxtools.staging import staged_folder

__all__ = ["adapt_feed", "compare_module", "compare_onnx", "compare_runners", "graph_signature", "ort_runner",
           "ort_session", "staged_folder"]
