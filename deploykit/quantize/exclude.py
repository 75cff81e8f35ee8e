"""Which layers stay float: one list of patterns for both INT8 paths.

The defaults follow NVIDIA's diffusers quantization example (TensorRT Model Optimizer,
``examples/diffusers/quantization``, its ``filter_func``): the time embedding and the per-block
projections of it (``time_emb_proj``), ``conv_in`` / ``conv_out`` (the model's data in and out, few
channels and the most sensitive to error), the ResNet shortcuts (``conv_shortcut``), SDXL's
``add_embedding`` and the output norm (``conv_norm_out``; norms are never quantized here anyway, the
pattern keeps the list aligned with theirs). Patterns are fnmatch globs on module names
(``down_blocks.0.resnets.0.conv_shortcut``), the names ``named_modules()`` gives.

ONNX graphs exported by torch.onnx (TorchScript exporter) name each node after the module that
made it: ``/unet/down_blocks.0/resnets.0/conv1/Conv``; :func:`onnx_node_module` maps that back to
``down_blocks.0.resnets.0.conv1`` so that the same patterns pick the same layers in both paths.
"""

from __future__ import annotations

from collections.abc import Sequence
from fnmatch import fnmatch

DEFAULT_EXCLUDE = ("conv_in", "conv_out", "*time_embedding*", "*time_emb_proj", "*conv_shortcut", "*add_embedding*",
                   "*norm_out*")
# wrappers whose name prefixes the UNet's modules in exported graphs (deploykit.models.wrappers.TensorOutput)
_WRAPPER_PREFIXES = ("unet",)


def is_excluded(module_name: str, patterns: Sequence[str]) -> bool:
    """Whether ``module_name`` (a ``named_modules()`` name) matches one of ``patterns``."""
    return any(fnmatch(module_name, p) for p in patterns)


def onnx_node_module(node_name: str) -> str | None:
    """``/unet/down_blocks.0/resnets.0/conv1/Conv`` -> ``down_blocks.0.resnets.0.conv1``; None for a
    node name that does not carry a module scope (``Conv_12``)."""
    if not node_name.startswith("/"):
        return None
    parts = node_name.strip("/").split("/")[:-1]  # the last part is the op (``Conv``, ``MatMul_1``)
    while parts and parts[0] in _WRAPPER_PREFIXES:
        parts = parts[1:]
    return ".".join(parts) if parts else None


def check_patterns(patterns: Sequence[str]) -> None:
    if isinstance(patterns, str):
        raise ValueError("exclude must be a list of glob patterns, not one string")
    bad = [p for p in patterns if not isinstance(p, str) or not p.strip()]
    if bad:
        raise ValueError(f"exclude patterns must be non-empty strings, got {bad!r}")
