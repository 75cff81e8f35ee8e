"""Counting what a model costs: multiply-accumulates per call and parameters.

MACs include attention on every device. torch's ``FlopCounterMode`` counts an op only where it has a
formula for the kernel that runs: the CUDA flash / memory-efficient kernels have one, the CPU flash
kernel (``_scaled_dot_product_flash_attention_for_cpu``) does not, and the math fallback (also what the
meta device runs) is counted as its matmuls. So ``scaled_dot_product_attention`` is counted here at
the call, from the shapes of q, k and v, and whatever kernel it dispatches to counts nothing: the
figure is the same on CPU, CUDA and meta.

Published tables (BK-SDM's 338.7 GMACs for the SD1.5 UNet at 512x512) count convolutions and linear
layers only; :class:`Macs` carries that figure beside the total as ``dense_layers``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils.flop_counter import FlopCounterMode

DENSE_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


@dataclass(frozen=True)
class Macs:
    """MACs of one forward call (a MAC is two FLOPs)."""

    total: int         # everything counted, attention score and value products included
    dense_layers: int  # convolutions and linear layers only, the convention of published tables

    @property
    def attention(self) -> int:
        return self.total - self.dense_layers


def attention_macs(query_shape: Sequence[int], key_shape: Sequence[int], value_shape: Sequence[int]) -> int:
    """MACs of softmax(Q K^T) V: the score product (L x S x E) and the value product (L x S x Ev) per batch and head.

    Leading dimensions are the query's (batch, heads); keys and values broadcast to them, as in
    grouped-query attention.
    """
    *lead, length, embed = query_shape
    source, value_embed = key_shape[-2], value_shape[-1]
    return math.prod(lead) * length * source * (embed + value_embed)


def _sdpa_shapes(args: tuple, kwargs: dict) -> tuple[torch.Size, torch.Size, torch.Size]:
    q, k, v = (args[i] if len(args) > i else kwargs[name] for i, name in enumerate(("query", "key", "value")))
    return q.shape, k.shape, v.shape


class _CountedAttention(TorchFunctionMode):
    """Counts each SDPA call from its shapes and takes back what the counter saw inside it."""

    def __init__(self, counter: FlopCounterMode):
        super().__init__()
        self.counter = counter
        self.macs = 0          # the analytic count of every attention call
        self.kernel_flops = 0  # what ``counter`` counted inside those calls (depends on the kernel)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        before = self.counter.get_total_flops()
        out = func(*args, **kwargs)
        self.kernel_flops += self.counter.get_total_flops() - before
        self.macs += attention_macs(*_sdpa_shapes(args, kwargs))
        return out


class _DenseLayerFlops:
    """What ``counter`` counts inside the model's convolutions and linear layers, read by forward hooks."""

    def __init__(self, model: nn.Module, counter: FlopCounterMode):
        self.model, self.counter = model, counter
        self.flops = 0
        self._started: dict[int, int] = {}
        self._handles: list = []

    def _pre(self, module, _):
        self._started[id(module)] = self.counter.get_total_flops()

    def _post(self, module, _, __):
        self.flops += self.counter.get_total_flops() - self._started.pop(id(module))

    def __enter__(self):
        for module in self.model.modules():
            if isinstance(module, DENSE_LAYERS):
                self._handles += [module.register_forward_pre_hook(self._pre), module.register_forward_hook(self._post)]
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()


@torch.no_grad()
def measure_macs(model: nn.Module, example_inputs: Sequence[torch.Tensor]) -> Macs:
    """MACs of one forward call on ``example_inputs``, with and without attention (see the module docstring)."""
    from deploykit.models.wrappers import tensor_view

    counter = FlopCounterMode(display=False)
    attention = _CountedAttention(counter)
    with _DenseLayerFlops(model, counter) as dense, counter, attention:
        tensor_view(model)(*example_inputs)
    other_flops = counter.get_total_flops() - attention.kernel_flops
    return Macs(total=other_flops // 2 + attention.macs, dense_layers=dense.flops // 2)


def count_macs(model: nn.Module, example_inputs: Sequence[torch.Tensor]) -> int:
    """MACs of one forward call on ``example_inputs``, attention included, the same on every device."""
    return measure_macs(model, example_inputs).total


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
