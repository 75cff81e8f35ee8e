"""Keeping a 2:4 student 2:4 while it trains (masks from :func:`deploykit.sparsity.sparsify`).

``mask_mode="fixed"`` re-applies the masks after every optimizer step (the masks chosen once, as
NVIDIA's ASP does). ``"sr-ste"`` keeps dense weights, runs the forward pass with the 2:4 magnitude
mask of the current weights (re-chosen every step, so a weight can come back), passes gradients
straight through and adds ``sr_ste_decay * (1 - mask) * w`` to the gradient of the masked-out
weights, which pulls them towards zero so the masks settle (SR-STE, Zhou et al., ICLR 2021; SparseDM
fine-tunes diffusion UNets with it). At the end the weights are masked and ``masks`` holds the final
choice.
"""

from __future__ import annotations

from collections.abc import MutableMapping

import torch
from torch import nn
from torch.nn.utils import parametrize

from deploykit.sparsity import apply_masks, check_2to4, magnitude_mask

MASK_MODES = ("fixed", "sr-ste")


class _SparseRefinedSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight: torch.Tensor, decay: float) -> torch.Tensor:
        mask = magnitude_mask(weight)
        ctx.save_for_backward(weight, mask)
        ctx.decay = decay
        return weight * mask

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        weight, mask = ctx.saved_tensors
        return grad + ctx.decay * weight * (~mask), None


class _SRSTEWeight(nn.Module):
    """A parametrization: the layer sees the 2:4-masked weight; the optimizer updates the dense one."""

    def __init__(self, decay: float):
        super().__init__()
        self.decay = decay

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return _SparseRefinedSTE.apply(weight, self.decay)


class MaskKeeper:
    """``start()`` before the optimizer is built, ``after_step()`` after each optimizer step, ``finish()`` at the end.

    A no-op without masks. Under SR-STE the optimizer, the EMA and the checkpoint all see the dense
    weights under their parametrized names (``...parametrizations.weight.original``), which is why
    ``start()`` must come before any of them is made.
    """

    def __init__(self, student: nn.Module, masks: MutableMapping[str, torch.Tensor] | None, mode: str = "fixed",
                 sr_ste_decay: float = 2e-4):
        if mode not in MASK_MODES:
            raise ValueError(f"mask_mode {mode!r} is not one of {MASK_MODES}")
        self.student, self.masks, self.mode, self.decay = student, masks, mode, sr_ste_decay
        self.sr_ste = bool(masks) and mode == "sr-ste"

    def start(self) -> None:
        if not self.masks:
            return
        if self.sr_ste:
            for name in self.masks:
                parametrize.register_parametrization(self.student.get_submodule(name), "weight", _SRSTEWeight(self.decay))
        else:
            apply_masks(self.student, self.masks)

    def after_step(self) -> None:
        if self.masks and not self.sr_ste:
            apply_masks(self.student, self.masks)

    def finish(self) -> None:
        if not self.masks:
            return
        if self.sr_ste:
            for name in self.masks:
                module = self.student.get_submodule(name)
                with torch.no_grad():
                    self.masks[name] = magnitude_mask(module.parametrizations.weight.original)
                parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)  # keeps the masked weight
        else:
            apply_masks(self.student, self.masks)
        bad = check_2to4(self.student, self.masks)
        if bad:  # a bug, not bad input: every path above leaves the masked weights 2:4
            raise RuntimeError("distill left weights that are not 2:4: " + "; ".join(map(str, bad[:3])))
