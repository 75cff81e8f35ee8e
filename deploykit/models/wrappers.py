"""Views of diffusers models that tracers and exporters can take."""

from __future__ import annotations

import torch
from torch import nn


class TensorOutput(nn.Module):
    """A UNet whose forward returns the predicted tensor, not diffusers' output dataclass.

    torch-pruning traces tensors and torch.onnx exports them; both need this view.
    """

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        return self.unet(sample, timestep, return_dict=False)[0]
