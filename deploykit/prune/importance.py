"""Importance criteria, selectable by name.

Each is a torch-pruning ``Importance`` (callable on a dependency group, returning one score per
channel), so any of them plugs into torch-pruning's pruners. Gradient criteria also name the
gradient loop they are defined by (``deploykit.prune.gradients``): the scores are all
sum_i |w_i * dL/dw_i| over a channel's weights; the papers differ in the loss L and the timesteps.
Calibrated criteria (``block-removal``) instead measure the model on calibration inputs before
scoring: their importance has a ``calibrate(model, forward)`` method, and the criterion names how
the calibration forward is built from the same data the gradient loops get.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

import torch
import torch_pruning as tp
from torch import nn

from deploykit.prune import blocks, gradients
from deploykit.prune.blocks import OutputForward
from deploykit.prune.gradients import ForwardLoop, GradientData


class CalibratedImportance(Protocol):
    def calibrate(self, model: nn.Module, forward: OutputForward) -> dict:
        """Measure ``model`` on the calibration inputs ``forward`` runs; return what to record (JSON-able)."""

    def __call__(self, group) -> torch.Tensor | None: ...


@dataclass(frozen=True)
class Criterion:
    name: str
    factory: Callable[[], tp.importance.Importance]
    summary: str
    gradient_loop: Callable[[GradientData], ForwardLoop] | None = None
    # calibrated criteria: builds forward(model) -> output on fixed inputs; the factory's importance
    # is a CalibratedImportance, calibrated on the model before it scores any group
    calibration: Callable[[GradientData], OutputForward] | None = None

    @property
    def needs_gradients(self) -> bool:
        return self.gradient_loop is not None

    @property
    def needs_calibration(self) -> bool:
        return self.calibration is not None

    @property
    def needs_data(self) -> bool:
        return self.needs_gradients or self.needs_calibration


_CRITERIA: dict[str, Criterion] = {}


def register(criterion: Criterion) -> Criterion:
    _CRITERIA[criterion.name] = criterion
    return criterion


def get_criterion(name: str) -> Criterion:
    try:
        return _CRITERIA[name]
    except KeyError:
        raise KeyError(f"unknown importance criterion {name!r} (known: {', '.join(sorted(_CRITERIA))})") from None


def available() -> list[str]:
    return sorted(_CRITERIA)


class BlockRemovalImportance(tp.importance.Importance):
    """One-shot block-removal importance (LAPTOP-Diff style), at channel level.

    LAPTOP-Diff removes whole blocks, ranked by the output MSE of the UNet when each block alone is
    removed (:func:`deploykit.prune.blocks.block_removal_scores`). We prune channels instead, so the
    block scores are spread over the channels (our formulation): in a Conv2d / Linear layer inside
    removable block b, a channel scores S_b x (that channel's L2 norm / the sum of the L2 norms of all
    the layer's channels along the pruned dimension). Layers in no removable block (conv_in, the time
    embedding, down/upsamplers, shortcuts) count as essential and take the largest S_b. A channel's
    score is the sum over its dependency group's layers, as torch-pruning's group importances sum.

    So channels of a block the output does not need score low, and within a block the weight norms
    still decide. :meth:`calibrate` (or :meth:`set_scores`) must run before the first group is scored.
    """

    def __init__(self):
        self.scores: dict[str, float] | None = None
        self._layer_scores: dict[nn.Module, float] = {}
        self._essential = 0.0

    def calibrate(self, model: nn.Module, forward: OutputForward) -> dict:
        self.set_scores(model, blocks.block_removal_scores(model, forward))
        return {"block_ranking": [{"block": name, "score": score} for name, score in blocks.rank_blocks(self.scores)]}

    def set_scores(self, model: nn.Module, scores: Mapping[str, float]) -> None:
        """Use ``scores`` (block name in ``model`` -> removal score) for ``model``'s layers."""
        self.scores = dict(scores)
        self._essential = max(self.scores.values(), default=1.0)
        self._layer_scores = {}
        # the innermost block wins: names are visited outer first, so an inner block overwrites
        for name, block in ((n, m) for n, m in model.named_modules() if n in self.scores):
            for layer in block.modules():
                if isinstance(layer, (nn.Conv2d, nn.Linear)):
                    self._layer_scores[layer] = self.scores[name]

    @staticmethod
    def _channel_shares(layer: nn.Module, out: bool) -> torch.Tensor:
        """Each channel's share of the layer's summed channel L2 norms, along the output or input dimension."""
        # weights are (out, in, ...) for Conv2d and Linear, (in, out, ...) for transposed convolutions
        w = layer.weight.detach()
        w = w.transpose(0, 1) if out == getattr(layer, "transposed", False) else w
        norms = w.flatten(1).float().norm(dim=1).cpu()
        if not out and isinstance(layer, nn.Conv2d) and layer.groups not in (1, layer.in_channels):
            norms = norms.repeat(layer.groups)  # as torch-pruning: grouped convolutions share input filters
        total = norms.sum()
        return norms / total if total > 0 else torch.zeros_like(norms)

    @torch.no_grad()
    def __call__(self, group) -> torch.Tensor | None:
        if self.scores is None:
            raise RuntimeError("BlockRemovalImportance scores a group only after calibrate(model, forward)")
        width = len(group[0].idxs)
        total, seen = torch.zeros(width), False
        for item in group:  # DepGraph's items: plain idxs in the layer, root_idxs the root channel each follows
            layer, fn = item.dep.target.module, item.dep.handler
            if fn in (tp.prune_conv_out_channels, tp.prune_linear_out_channels):
                out = True
            elif fn in (tp.prune_conv_in_channels, tp.prune_linear_in_channels):
                out = False
            else:
                continue  # norms and other parameter-free or non-weight dimensions
            roots = item.root_idxs
            if any(r is None for r in roots):
                continue  # as torch-pruning: no root channel to credit
            shares = self._channel_shares(layer, out)[list(item.idxs)]
            score = self._layer_scores.get(layer, self._essential)
            total.scatter_add_(0, torch.tensor(roots, dtype=torch.long), score * shares)
            seen = True
        return total if seen else None


def _taylor() -> tp.importance.Importance:
    return tp.importance.GroupTaylorImportance()  # multivariable=False: sum_i |w_i g_i|


register(Criterion("magnitude", lambda: tp.importance.GroupMagnitudeImportance(p=2),
                   "L2 norm of each channel's weights, summed over its dependency group"))
register(Criterion("random", lambda: tp.importance.RandomImportance(),
                   "uniform random scores: the floor every criterion must beat"))
register(Criterion("taylor", _taylor, "first-order Taylor from the denoising loss at random timesteps",
                   gradients.random_timesteps))
register(Criterion("diff-pruning", _taylor,
                   "Diff-Pruning: Taylor over t = 0..T with fixed noise, stopped once L_t < 0.05 L_max",
                   gradients.diff_pruning))
register(Criterion("nici", _taylor,
                   "NiCI: Taylor of the noise predicted on clean images, interval-sampled and damped over t",
                   gradients.nici))
register(Criterion("cap", _taylor,
                   "content-aware: Taylor of the output change an input perturbation induces (our formulation)",
                   gradients.cap))


register(Criterion("block-removal", BlockRemovalImportance,
                   "LAPTOP-Diff one-shot block removal: output MSE with each block removed, spread over its "
                   "channels by weight norm (our formulation)",
                   calibration=blocks.calibration_forward))
