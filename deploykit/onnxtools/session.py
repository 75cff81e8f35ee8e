"""ONNX Runtime sessions for checks, with the options every deploykit session uses
(:func:`deploykit.runtime.backends.ort_session_options`: same threads, no idle spinning)."""

from __future__ import annotations

from pathlib import Path

from deploykit.runtime.backends import ort_session_options


def ort_session(onnx_path: str | Path, threads: int | None = None):
    """An ONNX Runtime CPU session that logs errors only (its optimisers warn a lot on diffusers graphs)."""
    import onnxruntime as ort

    return ort.InferenceSession(str(onnx_path), ort_session_options(threads, quiet=True), providers=["CPUExecutionProvider"])


def ort_runner(onnx_path: str | Path, name: str | None = None):
    """A polygraphy runner on :func:`ort_session`."""
    from polygraphy.backend.onnxrt import OnnxrtRunner

    return OnnxrtRunner(ort_session(onnx_path), name=name)
