"""Views of diffusers models that tracers and exporters can take."""

from __future__ import annotations

import torch
from torch import nn


class TensorOutput(nn.Module):
    """A UNet whose forward takes positional tensors and returns the predicted tensor.

    torch-pruning traces tensors and torch.onnx exports them; both need plain tensors in and out, not
    diffusers' output dataclass or SDXL's ``added_cond_kwargs`` dict. The positional order is
    :func:`deploykit.models.inputs.unet_input_names`.
    """

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                text_embeds: torch.Tensor | None = None, time_ids: torch.Tensor | None = None) -> torch.Tensor:
        if encoder_hidden_states is None:
            return self.unet(sample, timestep, return_dict=False)[0]
        added = {"text_embeds": text_embeds, "time_ids": time_ids} if text_embeds is not None else None
        return self.unet(sample, timestep, encoder_hidden_states, added_cond_kwargs=added, return_dict=False)[0]


def tensor_view(model: nn.Module) -> nn.Module:
    return model if isinstance(model, TensorOutput) else TensorOutput(model)
