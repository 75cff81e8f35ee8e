"""Structured pruning: ``prune_to_macs(model, example_inputs, config, forward_loop)``."""

from deploykit.prune.core import DEFAULT_IGNORED, PruneConfig, PruneResult, prune_to_macs
from deploykit.prune.gradients import GradientData
from deploykit.prune.importance import Criterion, available, get_criterion, register

__all__ = ["DEFAULT_IGNORED", "Criterion", "GradientData", "PruneConfig", "PruneResult", "available", "get_criterion",
           "prune_to_macs", "register"]
