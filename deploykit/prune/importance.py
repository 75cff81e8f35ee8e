"""Importance criteria, selectable by name.

Each is a torch-pruning ``Importance`` (callable on a dependency group, returning one score per
channel), so any of them plugs into torch-pruning's pruners. Gradient criteria also name the
gradient loop they are defined by (``deploykit.prune.gradients``): the scores are all
sum_i |w_i * dL/dw_i| over a channel's weights; the papers differ in the loss L and the timesteps.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch_pruning as tp

from deploykit.prune import gradients
from deploykit.prune.gradients import ForwardLoop, GradientData


@dataclass(frozen=True)
class Criterion:
    name: str
    factory: Callable[[], tp.importance.Importance]
    summary: str
    gradient_loop: Callable[[GradientData], ForwardLoop] | None = None

    @property
    def needs_gradients(self) -> bool:
        return self.gradient_loop is not None


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
