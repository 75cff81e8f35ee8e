"""ONNX Runtime sessions for checks (not for latency measurements: see deploykit.runtime.backends)."""

from __future__ import annotations

from pathlib import Path


def ort_session(onnx_path: str | Path, threads: int | None = None):
    """An ONNX Runtime CPU session for checks: logs errors only (its optimisers warn a lot on diffusers
    graphs) and does not spin idle threads. Not for latency measurements."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    # idle ONNX Runtime threads spin by default, which starves torch running beside it in a comparison
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])


def ort_runner(onnx_path: str | Path, name: str | None = None):
    """A polygraphy runner on :func:`ort_session`."""
    from polygraphy.backend.onnxrt import OnnxrtRunner

    return OnnxrtRunner(ort_session(onnx_path), name=name)
