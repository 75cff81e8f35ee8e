"""Calibration data: the UNet's inputs along the teacher's own sampling trajectories.

INT8 ranges are set from activations, and a diffusion UNet's activations change with the timestep
and with how far a sample has been denoised; random inputs miss both. So the calibration set is
recorded while the teacher samples: every UNet call of a few short sampling runs (noise for pixel
UNets, prompts for Stable Diffusion pipelines) becomes one calibration batch, in
:func:`deploykit.models.inputs.unet_input_names` order (the UNet's description,
:mod:`deploykit.models.io_spec`). The student is calibrated on the same batches:
they are the inputs it will see.

The algorithms never own the data: :func:`deploykit.quantize.onnx_int8.quantize_onnx` takes an
iterable of input dicts and :func:`deploykit.quantize.modelopt_int8.quantize_modelopt` a
``forward_loop(model)`` (:func:`forward_loop` makes one from the batches), as modelopt's
``mtq.quantize(model, config, forward_loop)`` does.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn

from deploykit.models.io_spec import unet_io

CalibrationBatch = dict[str, np.ndarray]  # UNet input name -> array


def _numpy(x) -> np.ndarray:
    return (x.detach().float() if x.is_floating_point() else x.detach()).cpu().numpy().copy()


class RecordingDenoiser:
    """Wraps a denoise callable ``(*unet_inputs) -> noise``; every call's inputs are kept in ``batches``."""

    def __init__(self, denoise: Callable[..., torch.Tensor], names: Sequence[str]):
        self.denoise, self.names = denoise, tuple(names)
        self.batches: list[CalibrationBatch] = []

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        self.batches.append({n: _numpy(torch.as_tensor(x)) for n, x in zip(self.names, inputs)})
        return self.denoise(*inputs)


@contextmanager
def record_unet_calls(unet: nn.Module) -> Iterator[list[CalibrationBatch]]:
    """Record every call of a diffusers UNet, as a pipeline makes it, into the yielded list: its inputs named
    and ordered by the UNet's description (:meth:`deploykit.models.io_spec.UNetIO.named_inputs`)."""
    io = unet_io(unet)
    batches: list[CalibrationBatch] = []

    def hook(module, args, kwargs):
        batches.append({n: _numpy(x) for n, x in io.named_inputs(args, kwargs).items()})

    handle = unet.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield batches
    finally:
        handle.remove()


def forward_loop(batches: Sequence[CalibrationBatch], names: Sequence[str]) -> Callable[[nn.Module], None]:
    """A modelopt-style ``forward_loop(model)`` that runs ``batches`` through a positional-input model
    (:class:`deploykit.models.wrappers.TensorOutput`)."""

    @torch.no_grad()
    def loop(model: nn.Module) -> None:
        for batch in batches:
            model(*(torch.from_numpy(batch[n]) for n in names))

    return loop


def summarize(batches: Sequence[CalibrationBatch]) -> dict:
    """What the calibration set holds: batch count, samples, the timesteps seen."""
    if not batches:
        return {"batches": 0, "samples": 0}
    t = np.concatenate([np.ravel(b["timestep"]) for b in batches])
    return {"batches": len(batches), "samples": int(sum(len(b["sample"]) for b in batches)),
            "inputs": {n: list(v.shape[1:]) for n, v in batches[0].items()},
            "timesteps": {"min": float(t.min()), "max": float(t.max()), "distinct": int(len(np.unique(t)))}}
