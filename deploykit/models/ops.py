"""Counting what a model costs: multiply-accumulates per call and parameters."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


@torch.no_grad()
def count_macs(model: nn.Module, example_inputs: Sequence[torch.Tensor]) -> int:
    """MACs of one forward call on ``example_inputs`` (convolutions, matmuls and attention).

    torch's own FlopCounterMode counts scaled-dot-product attention too, which per-layer hook
    counters miss; a MAC is two FLOPs.
    """
    with FlopCounterMode(display=False) as counter:
        model(*example_inputs)
    return int(counter.get_total_flops() // 2)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
