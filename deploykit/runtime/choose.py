"""Which backend runs an artifact: the fastest one this machine and this artifact both have.

Order of preference: TensorRT, ONNX Runtime CUDA, torch CUDA, ONNX Runtime CPU, OpenVINO CPU, torch
CPU. ONNX Runtime comes before torch on each device because it ran the same UNets faster in our
measurements (about 1.6x for the SD1.5 UNet on CPU); TensorRT first because it is built for the
device. OpenVINO (an optional extra) is chosen only when asked for: in fp32 it ran the SD1.5 UNet
at ONNX Runtime's speed on this project's machines (docs/cpu.md), and ONNX Runtime is always installed.
"""

from __future__ import annotations

from dataclasses import dataclass

from deploykit.errors import InputError

PREFERENCE = ("tensorrt", "onnxruntime-cuda", "torch-cuda", "onnxruntime-cpu", "openvino-cpu", "torch-cpu")


@dataclass(frozen=True)
class ArtifactParts:
    onnx: bool      # an onnx/ folder the runtime can load
    engines: bool   # TensorRT engines under engines/


def _ort_providers() -> list[str]:
    try:
        import onnxruntime as ort
    except ImportError:
        return []
    return ort.get_available_providers()


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def unavailable_reason(name: str, parts: ArtifactParts) -> str | None:
    """None where ``name`` can run this artifact here; otherwise why not, in words."""
    if name == "tensorrt":
        if not parts.engines:
            return "the artifact has no TensorRT engines (engines/)"
        try:
            import tensorrt  # noqa: F401
        except ImportError:
            return "tensorrt is not installed"
        return "deploykit.runtime has no TensorRT runner yet"
    if name.startswith("onnxruntime-"):
        if not parts.onnx:
            return "the artifact has no ONNX export (add an export stage to the recipe)"
        providers = _ort_providers()
        if not providers:
            return "onnxruntime is not installed"
        if name == "onnxruntime-cuda" and "CUDAExecutionProvider" not in providers:
            return "this onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu on a CUDA machine)"
        return None
    if name == "openvino-cpu":
        if not parts.onnx:
            return "the artifact has no ONNX export (add an export stage to the recipe)"
        from deploykit.runtime.openvino import openvino_missing

        return openvino_missing()
    if name == "torch-cuda":
        return None if _cuda() else "torch sees no CUDA device"
    if name == "torch-cpu":
        return None
    raise InputError(f"unknown backend {name!r} (known: {', '.join(PREFERENCE)})")


def choose_backend(parts: ArtifactParts, requested: str | None = None) -> str:
    if requested is not None:
        reason = unavailable_reason(requested, parts)
        if reason is not None:
            raise InputError(f"backend {requested} cannot run here: {reason}")
        return requested
    for name in PREFERENCE:
        if unavailable_reason(name, parts) is None:
            return name
    raise InputError("no backend can run this artifact")  # torch-cpu always can; kept for clarity
