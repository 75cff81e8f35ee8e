"""Structured pruning: ``prune_to_macs(model, example_inputs, config, forward_loop)``."""

from deploykit.prune.core import ATTENTION_MODES, DEFAULT_IGNORED, SD_IGNORED, PruneConfig, PruneResult, default_ignored, prune_to_macs
from deploykit.prune.gradients import GradientData
from deploykit.prune.importance import Criterion, available, get_criterion, register

__all__ = ["ATTENTION_MODES", "DEFAULT_IGNORED", "SD_IGNORED", "Criterion", "GradientData", "PruneConfig", "PruneResult",
           "available", "default_ignored", "get_criterion", "prune_to_macs", "register"]
