"""Structured pruning: ``prune_to_macs(model, example_inputs, config, forward_loop)``."""

from deploykit.prune.core import DEFAULT_IGNORED, PruneConfig, PruneResult, prune_to_macs
from deploykit.prune.importance import Criterion, available, get_criterion, register

__all__ = ["DEFAULT_IGNORED", "Criterion", "PruneConfig", "PruneResult", "available", "get_criterion",
           "prune_to_macs", "register"]
