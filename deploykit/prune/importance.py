"""Importance criteria, selectable by name.

Each is a torch-pruning ``Importance`` (callable on a dependency group, returning one score per
channel), so any of them plugs into torch-pruning's pruners. Criteria that read gradients say so:
the caller runs its forward loop (loss + backward) before pruning.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch_pruning as tp


@dataclass(frozen=True)
class Criterion:
    name: str
    factory: Callable[[], tp.importance.Importance]
    needs_gradients: bool
    summary: str


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


register(Criterion("magnitude", lambda: tp.importance.GroupMagnitudeImportance(p=2), False,
                   "L2 norm of each channel's weights, summed over its dependency group"))
register(Criterion("random", lambda: tp.importance.RandomImportance(), False,
                   "uniform random scores: the floor every criterion must beat"))
register(Criterion("taylor", lambda: tp.importance.GroupTaylorImportance(), True,
                   "first-order Taylor |w * dL/dw| from the denoising loss on the caller's data"))
