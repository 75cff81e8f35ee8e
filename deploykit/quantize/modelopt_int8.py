"""INT8 for TensorRT: TensorRT Model Optimizer (modelopt) PTQ, exported as a QDQ ONNX graph.

As NVIDIA's diffusers example does it (``examples/diffusers/quantization``): INT8 SmoothQuant for the
linear layers (per-channel weights, per-tensor activations after migrating activation outliers into the
weights with strength ``alpha``), and for the convolutions per-channel weights with per-tensor activation
ranges from a histogram percentile (``conv_calibration: percentile``) or the plain maximum (``max``).
Excluded layers (:data:`deploykit.quantize.exclude.DEFAULT_EXCLUDE`) get ``{"enable": False}`` entries.

``quantize_modelopt(model, forward_loop, ModeloptInt8Config())`` quantizes a copy of the torch UNet
(fake-quantized modules, usable in torch); :func:`export_qdq_onnx` writes it through torch.onnx, where
modelopt's quantizers become QuantizeLinear / DequantizeLinear pairs, the graph TensorRT builds INT8
engines from (``trtexec --onnx=... --int8 --fp16``). ONNX Runtime runs the same graph on CPU.

modelopt is an optional dependency (``pip install 'deploykit[modelopt]'``), imported only here, lazily.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from deploykit.errors import InputError
from deploykit.quantize.exclude import DEFAULT_EXCLUDE, check_patterns

INSTALL_HINT = "pip install 'deploykit[modelopt]' (nvidia-modelopt)"


@dataclass
class ModeloptInt8Config:
    exclude: Sequence[str] = DEFAULT_EXCLUDE
    alpha: float = 0.8                    # SmoothQuant migration strength (NVIDIA's SD example: 0.8)
    conv_calibration: str = "percentile"  # percentile | max
    percentile: float = 99.99             # of |activation|, for the convolutions' input ranges
    per_channel: bool = True              # weights: one scale per output channel

    def __post_init__(self) -> None:
        check_patterns(self.exclude)
        if self.conv_calibration not in ("percentile", "max"):
            raise ValueError(f"conv_calibration must be percentile or max, got {self.conv_calibration!r}")
        if not 0 <= self.alpha <= 1:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")


def require_modelopt():
    """modelopt's quantization module, or an :class:`InputError` that says how to install it."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import modelopt.torch.quantization as mtq
    except ImportError as e:
        raise InputError(f"the modelopt INT8 path needs nvidia-modelopt, which is not installed ({e}): {INSTALL_HINT}") from None
    return mtq


def modelopt_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("modelopt") is not None


def _percentile_calibrator(percentile: float):
    """A histogram calibrator whose amax is a percentile of |x| (modelopt's histogram calibrator needs the
    method passed at compute time; SmoothQuant's max pass calls it without one)."""
    from modelopt.torch.quantization.calib import HistogramCalibrator

    class PercentileCalibrator(HistogramCalibrator):
        def compute_amax(self, method: str = "percentile", **kwargs):
            if method == "percentile":
                kwargs.setdefault("percentile", percentile)
            return super().compute_amax(method, **kwargs)

    return PercentileCalibrator


def build_config(model: nn.Module, config: ModeloptInt8Config) -> dict:
    """The modelopt quant config: INT8 SmoothQuant, percentile (or max) activations for each Conv2d, exclusions."""
    weight_axis = 0 if config.per_channel else None
    entries: list[dict] = [
        {"quantizer_name": "*", "enable": False},
        {"quantizer_name": "*weight_quantizer", "cfg": {"num_bits": 8, "axis": weight_axis}},
        {"quantizer_name": "*input_quantizer", "cfg": {"num_bits": 8, "axis": None}},
    ]
    if config.conv_calibration == "percentile":
        calibrator = (_percentile_calibrator(config.percentile), (), {})
        for name, module in model.named_modules():
            if isinstance(module, nn.Conv2d):
                entries.append({"quantizer_name": f"{name}.input_quantizer",
                                "cfg": {"num_bits": 8, "axis": None, "calibrator": calibrator}})
    # exclusions last: later entries win
    for pattern in config.exclude:
        entries.append({"quantizer_name": f"{pattern}.*", "enable": False})
        entries.append({"quantizer_name": f"{pattern}", "enable": False})
    return {"quant_cfg": entries, "algorithm": {"method": "smoothquant", "alpha": config.alpha}}


def quantize_modelopt(model: nn.Module, forward_loop: Callable[[nn.Module], None],
                      config: ModeloptInt8Config | None = None) -> nn.Module:
    """A fake-quantized INT8 copy of ``model`` calibrated by ``forward_loop(model)`` (``model`` is untouched).

    ``model`` takes positional inputs (:class:`deploykit.models.wrappers.TensorOutput`); module names
    (and so the exclude patterns) are matched below the wrapper (``unet.conv_in`` matches ``conv_in``).
    """
    mtq = require_modelopt()
    config = config or ModeloptInt8Config()
    model = copy.deepcopy(model).eval()
    prefix = "unet." if hasattr(model, "unet") else ""
    scoped = ModeloptInt8Config(exclude=tuple(f"{prefix}{p}" if not p.startswith("*") else p for p in config.exclude),
                                alpha=config.alpha, conv_calibration=config.conv_calibration,
                                percentile=config.percentile, per_channel=config.per_channel)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        model = mtq.quantize(model, build_config(model, scoped), forward_loop)
    return model


def quantizer_states(model: nn.Module) -> dict[str, bool]:
    """Module name -> whether its weight quantizer is enabled (for reports and tests)."""
    out = {}
    for name, module in model.named_modules():
        wq = getattr(module, "weight_quantizer", None)
        if wq is not None and hasattr(wq, "is_enabled"):
            out[name.removeprefix("unet.")] = bool(wq.is_enabled)
    return out


def export_qdq_onnx(model: nn.Module, path: str | Path, example_inputs: Sequence[torch.Tensor], opset: int = 17) -> Path:
    """The fake-quantized UNet as a QDQ ONNX graph at ``path`` (optimum's names; no constant folding, which
    would fold the weights' QuantizeLinear away from the pattern TensorRT reads)."""
    from deploykit.export.onnx import export_unet

    require_modelopt()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return export_unet(model, path, example_inputs, opset=max(opset, 13), clean=False)
