"""Distillation of pruned students from their dense teacher (DaKD's loss terms):
``distill(student, teacher, noise_scheduler, batches, config)``."""

from deploykit.distill.core import DistillConfig, distill
from deploykit.distill.trainer import Batch, DistillTrainer

__all__ = ["Batch", "DistillConfig", "DistillTrainer", "distill"]
