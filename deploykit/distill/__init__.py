"""Recovery of pruned students: ``recover(student, teacher, noise_scheduler, batches, config)``."""

from deploykit.distill.recovery import RecoveryConfig, recover

__all__ = ["RecoveryConfig", "recover"]
