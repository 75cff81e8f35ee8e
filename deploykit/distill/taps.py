"""Where feature and attention KD look inside a UNet, and the forward hooks that record it.

**Feature taps** are the outputs of the UNet's blocks: every ``down_blocks.i`` (its hidden states,
not the skip tuple), ``mid_block`` and every ``up_blocks.i``, the same points LAPTOP-Diff and BK-SDM
distil. **Attention taps** are the outputs of every diffusers ``Attention``: the heads' concatenated
``softmax(QK^T / sqrt(d)) V``, read as the input of its output projection ``to_out[0]``. We tap
outputs rather than attention maps because the maps cost O(N^2) memory per layer (4096^2 per head at
SD's 64x64 latents) and need an unfused attention processor, while the outputs are the maps applied
to the values, come out of any processor (SDPA, flash) unchanged, and cost one tensor per layer.

A pruned student keeps its teacher's module names and spatial sizes but not its widths: on the zoo
teacher pruned to half its MACs every block output and every attention output is narrower (48 -> 32,
96 -> 64 channels), because DepGraph prunes the residual streams the blocks write to. Matching-width
taps alone would leave nothing to distil, so a learned :class:`~deploykit.distill.losses.ChannelProjection`
maps each narrower student tap to the teacher's width (FitNets); a tap at full width is compared
as it is.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from deploykit.models.inputs import unet_of


def block_output_names(model: nn.Module) -> list[str]:
    unet = unet_of(model)
    names = [f"down_blocks.{i}" for i in range(len(unet.down_blocks))]
    if getattr(unet, "mid_block", None) is not None:
        names.append("mid_block")
    return names + [f"up_blocks.{i}" for i in range(len(unet.up_blocks))]


def attention_names(model: nn.Module) -> list[str]:
    from diffusers.models.attention_processor import Attention

    return [name for name, m in unet_of(model).named_modules() if isinstance(m, Attention)]


class Taps:
    """Forward hooks that record named intermediate tensors of a UNet while :meth:`recording`.

    ``features`` are module outputs (the first element of a block's tuple); ``attention`` names
    ``Attention`` modules whose output-projection input is recorded. Hooks stay registered for the
    model's life in training, and record only inside :meth:`recording`, so a forward pass elsewhere
    (sampling, export) costs nothing and keeps nothing.
    """

    def __init__(self, model: nn.Module, features: Sequence[str] = (), attention: Sequence[str] = ()):
        unet = unet_of(model)
        self.names = list(features) + list(attention)
        self._store: dict[str, torch.Tensor] | None = None
        self._handles = []
        for name in features:
            self._handles.append(unet.get_submodule(name).register_forward_hook(self._output_hook(name)))
        for name in attention:
            out_proj = unet.get_submodule(name).to_out[0]
            self._handles.append(out_proj.register_forward_pre_hook(self._input_hook(name)))

    def _output_hook(self, name: str):
        def hook(module, args, output):
            if self._store is not None:
                self._store[name] = output[0] if isinstance(output, tuple) else output
        return hook

    def _input_hook(self, name: str):
        def hook(module, args):
            if self._store is not None:
                self._store[name] = args[0]
        return hook

    @contextmanager
    def recording(self) -> Iterator[dict[str, torch.Tensor]]:
        self._store = store = {}
        try:
            yield store
        finally:
            self._store = None

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __bool__(self) -> bool:
        return bool(self.names)
