"""An ONNX UNet (an INT8 QDQ graph, say) in the place of a diffusers UNet inside a diffusers pipeline."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from deploykit.models.io_spec import unet_io, unet_of
from deploykit.runtime.backends import OnnxRuntimeBackend


def with_onnx_forward(onnx_path: str | Path, model: nn.Module, providers: list[str] | None = None) -> nn.Module:
    """``model``'s UNet (its config, dtype and device, which pipelines read) with its forward replaced by the
    ONNX graph at ``onnx_path`` run in ONNX Runtime. Pipelines call it as they call the UNet."""
    unet = unet_of(model)
    io = unet_io(unet)
    backend = OnnxRuntimeBackend(onnx_path, providers)

    def forward(sample, timestep, encoder_hidden_states=None, added_cond_kwargs=None, return_dict=True, **_):
        values = io.named_inputs((sample, timestep), {"encoder_hidden_states": encoder_hidden_states,
                                                      "added_cond_kwargs": added_cond_kwargs})
        out = backend(*(x.float() if x.is_floating_point() else x for x in values.values()))
        out = out.to(sample.dtype)
        if not return_dict:
            return (out,)
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

        return UNet2DConditionOutput(sample=out)

    unet.forward = forward
    return unet
