"""Structured channel pruning of diffusion UNets to a MACs target.

torch-pruning's DepGraph finds the coupled channels (residual adds, skip concatenations, GroupNorm
groups); we choose how many to remove. One pruning ratio does not map to one MACs ratio: GroupNorm
groups are pruned evenly and channel rounding quantises the result. So the ratio is found by
bisection on the measured MACs, each trial pruning a fresh copy.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch_pruning as tp
from torch import nn

from deploykit.models.ops import count_macs, count_params
from deploykit.models.sync import sync_diffusers_attributes
from deploykit.models.wrappers import TensorOutput
from deploykit.prune.importance import get_criterion

# Layers whose output channels stay dense unless told otherwise: conv_out (its outputs are the
# model's output) and the embeddings every block reads. conv_in is not here: its input is the data
# and is never pruned, and its outputs are the first level's width, where most of the MACs are.
DEFAULT_IGNORED = ("conv_out", "time_embedding.*", "class_embedding.*")


@dataclass
class PruneConfig:
    criterion: str = "magnitude"
    macs_target: float = 0.5          # student MACs / teacher MACs, upper bound
    round_to: int | None = 8          # keep channel counts multiples of this
    ignored: Sequence[str] = DEFAULT_IGNORED  # fnmatch patterns of module names
    max_layer_ratio: float = 0.9      # never remove more than this share of one layer
    search_steps: int = 10
    tolerance: float = 0.02           # stop once within this of the target
    seed: int = 0


@dataclass
class PruneResult:
    macs_before: int
    macs_after: int
    params_before: int
    params_after: int
    pruning_ratio: float
    trials: list[dict] = field(default_factory=list)
    gradient_seconds: float = 0.0  # time the criterion's gradient loop took

    @property
    def macs_ratio(self) -> float:
        return self.macs_after / self.macs_before


def _ignored_modules(model: nn.Module, patterns: Sequence[str]) -> list[nn.Module]:
    from fnmatch import fnmatch

    return [m for name, m in model.named_modules()
            if name and any(fnmatch(name, p) for p in patterns) and isinstance(m, (nn.Conv2d, nn.Linear))]


def _channel_groups(model: nn.Module, round_to: int | None) -> dict[nn.Module, int]:
    """Output channel groups that keep every width a multiple of ``round_to``.

    torch-pruning removes the same channels from each of a layer's channel groups, which is what
    keeps GroupNorm groups equal. Declaring ``lcm(round_to, GroupNorm groups)`` groups on every layer
    makes widths multiples of both. (torch-pruning's own ``round_to`` mixes per-group and total counts
    under GroupNorm and then removes far more than asked.)
    """
    k = round_to or 1
    for m in model.modules():
        if isinstance(m, nn.GroupNorm):
            k = math.lcm(k, m.num_groups)
    groups: dict[nn.Module, int] = {}
    if k <= 1:
        return groups
    for m in model.modules():
        width = m.out_channels if isinstance(m, nn.Conv2d) else m.out_features if isinstance(m, nn.Linear) else 0
        if width and width % k == 0 and width > k:
            groups[m] = k
    return groups


def _prune_copy(model: nn.Module, example_inputs: Sequence[torch.Tensor], cfg: PruneConfig, ratio: float) -> nn.Module:
    trial = copy.deepcopy(model)
    for p_trial, p in zip(trial.parameters(), model.parameters()):
        if p.grad is not None:
            p_trial.grad = p.grad.clone()
    if ratio <= 0:
        return trial
    torch.manual_seed(cfg.seed)  # the random criterion draws from the global generator
    wrapped = TensorOutput(trial)
    pruner = tp.pruner.BasePruner(
        wrapped,
        example_inputs=tuple(example_inputs),
        importance=get_criterion(cfg.criterion).factory(),
        pruning_ratio=ratio,
        max_pruning_ratio=cfg.max_layer_ratio,
        ignored_layers=_ignored_modules(trial, cfg.ignored),
        out_channel_groups=_channel_groups(trial, cfg.round_to),
        global_pruning=False,
    )
    pruner.step()
    sync_diffusers_attributes(trial)
    for p in trial.parameters():
        p.grad = None
    return trial


def prune_to_macs(
    model: nn.Module,
    example_inputs: Sequence[torch.Tensor],
    config: PruneConfig,
    forward_loop: Callable[[nn.Module], None] | None = None,
    on_trial: Callable[[dict], None] | None = None,
) -> tuple[nn.Module, PruneResult]:
    """Prune a copy of ``model`` to at most ``config.macs_target`` of its MACs.

    ``forward_loop(model)`` runs the caller's data through the model and calls ``backward()``; it is
    needed by gradient criteria (``taylor``) and ignored by the others. ``model`` is not modified.
    """
    criterion = get_criterion(config.criterion)
    if not 0 < config.macs_target <= 1:
        raise ValueError(f"macs_target must be in (0, 1], got {config.macs_target}")
    model = copy.deepcopy(model).eval()
    if criterion.needs_gradients:
        if forward_loop is None:
            raise ValueError(f"criterion {criterion.name!r} needs gradients: pass a forward_loop")
        model.zero_grad(set_to_none=True)
        started = time.perf_counter()
        with torch.enable_grad():
            forward_loop(model)
        gradient_seconds = time.perf_counter() - started
    else:
        gradient_seconds = 0.0
    macs_before = count_macs(model, example_inputs)
    params_before = count_params(model)

    best: tuple[float, nn.Module, int] | None = None
    lo, hi = 0.0, config.max_layer_ratio
    trials: list[dict] = []
    for _ in range(config.search_steps):
        ratio = (lo + hi) / 2
        candidate = _prune_copy(model, example_inputs, config, ratio)
        macs = count_macs(candidate, example_inputs)
        trial = {"pruning_ratio": round(ratio, 5), "macs_ratio": round(macs / macs_before, 5)}
        trials.append(trial)
        if on_trial:
            on_trial(trial)
        if macs / macs_before <= config.macs_target:
            if best is None or ratio < best[0]:
                best = (ratio, candidate, macs)
            hi = ratio
            if config.macs_target - macs / macs_before <= config.tolerance:
                break
        else:
            lo = ratio
    if best is None:
        raise ValueError(f"could not reach {config.macs_target:.0%} of the MACs (closest "
                         f"{min(t['macs_ratio'] for t in trials):.1%}); raise macs_target, lower round_to "
                         "or ignore fewer layers")
    ratio, pruned, macs_after = best
    pruned.zero_grad(set_to_none=True)
    return pruned.eval(), PruneResult(macs_before, macs_after, params_before, count_params(pruned), ratio, trials,
                                      gradient_seconds)
