"""Counting what a model costs: multiply-accumulates per call and parameters."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


@torch.no_grad()
def count_macs(model: nn.Module, example_inputs: Sequence[torch.Tensor]) -> int:
    """MACs of one forward call on ``example_inputs`` (convolutions, linear layers, matmuls); a MAC is two FLOPs.

    Fused attention is counted only where torch has a FLOP formula for the kernel that runs: the
    CUDA flash / memory-efficient kernels have one, the CPU flash kernel of torch 2.13 does not. CPU
    figures therefore leave the attention score and value products out, which is the convention of
    BK-SDM's 338.7 GMACs for the SD1.5 UNet at 512x512 (401.6 G with them). Compare ratios measured
    on the same device.
    """
    from deploykit.models.wrappers import tensor_view

    with FlopCounterMode(display=False) as counter:
        tensor_view(model)(*example_inputs)
    return int(counter.get_total_flops() // 2)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
