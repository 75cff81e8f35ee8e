"""Recovery of pruned students by distillation (DaKD): ``recover(student, teacher, noise_scheduler, batches, config)``."""

from deploykit.distill.recovery import RecoveryConfig, recover
from deploykit.distill.trainer import Batch, DistillTrainer

__all__ = ["Batch", "DistillTrainer", "RecoveryConfig", "recover"]
