"""Distillation of a pruned student from its dense teacher, with DaKD's loss terms in our formulation.

``distill(student, teacher, noise_scheduler, batches, config)`` fine-tunes the student on noised
samples of the caller's data at uniformly drawn timesteps with the weighted sum of the terms in
:mod:`deploykit.distill.losses`: the denoising loss (Diff-Pruning's recovery), output KD, feature
KD at block outputs and attention KD (normalised by the teacher's norm, LAPTOP-Diff), a
noise-distribution term (NiCI) and an adversarial term. Every weight is configurable and 0 turns a
term off, out of the loss and out of the computation. The defaults (denoising + output KD) are the
fine-tuning deploykit ran before DaKD.

The algorithm never owns the data: ``batches(step, generator)`` returns a step's clean batch. Because
the batch, the timesteps and the noise of step ``k`` are drawn from generators seeded by ``(seed, k)``,
a run resumed from a checkpoint continues with exactly the numbers it would have seen, and a run over
several processes (:mod:`deploykit.distill.trainer`) sees the same batch as one process.

A 2:4 student (``masks`` from :func:`deploykit.sparsity.sparsify`) stays 2:4 (:mod:`deploykit.distill.sparse`).
"""

from __future__ import annotations

from collections.abc import Callable, MutableMapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from torch import nn

from deploykit.distill.sparse import MASK_MODES
from deploykit.distill.trainer import Batch, DistillTrainer

MIXED_PRECISION = ("no", "fp16", "bf16")
TERMS = ("denoise", "output_kd", "feature_kd", "attention_kd", "distribution_kd", "adversarial")


@dataclass
class DistillConfig:
    steps: int = 300
    lr: float = 5e-4
    warmup_steps: int = 20
    weight_decay: float = 0.0
    # the loss: each term's weight, 0 = off (see deploykit.distill.losses)
    denoise_weight: float = 1.0
    output_kd_weight: float = 1.0
    feature_kd_weight: float = 0.0
    attention_kd_weight: float = 0.0
    distribution_kd_weight: float = 0.0
    distribution_temperature: float = 1.0
    adversarial_weight: float = 0.0
    adversarial_warmup: int = 100        # steps before the discriminator and its term start
    discriminator_lr: float = 2e-4
    grad_clip: float = 1.0
    checkpoint_every: int = 50
    seed: int = 0
    mask_mode: str = "fixed"             # 2:4 students: "fixed" or "sr-ste"
    sr_ste_decay: float = 2e-4           # sr-ste: lambda_W of SR-STE
    mixed_precision: str = "no"          # "no", "fp16", "bf16" (accelerate's autocast; GPUs)
    gradient_accumulation: int = 1       # micro-batches per optimizer step (the batch is split, not repeated)
    ema_decay: float = 0.0               # EMA of the student's weights (0 = off); the result is the EMA

    def __post_init__(self):
        if self.mask_mode not in MASK_MODES:
            raise ValueError(f"mask_mode {self.mask_mode!r} is not one of {MASK_MODES}")
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"mixed_precision {self.mixed_precision!r} is not one of {MIXED_PRECISION}")
        if any(w < 0 for w in self.weights().values()):
            raise ValueError("loss weights must be >= 0")
        if not any(self.weights().values()):
            raise ValueError("every loss weight is 0: nothing to train on")
        if self.distribution_temperature <= 0:
            raise ValueError("distribution_temperature must be > 0")
        if self.gradient_accumulation < 1:
            raise ValueError("gradient_accumulation must be >= 1")
        if not 0 <= self.ema_decay < 1:
            raise ValueError("ema_decay must be in [0, 1)")

    def weights(self) -> dict[str, float]:
        return {term: getattr(self, f"{term}_weight") for term in TERMS}

    @classmethod
    def from_fields(cls, source, **overrides) -> DistillConfig:
        """The config from any object with attributes of the same names (a recipe's distill stage)."""
        names = {f.name for f in fields(cls)}
        return cls(**{n: getattr(source, n) for n in names if hasattr(source, n)}, **overrides)


def distill(
    student: nn.Module,
    teacher: nn.Module,
    noise_scheduler,
    batches: Callable[[int, torch.Generator], torch.Tensor | Batch],
    config: DistillConfig,
    checkpoint_dir: str | Path | None = None,
    on_step: Callable[[int, dict], None] | None = None,
    masks: MutableMapping[str, torch.Tensor] | None = None,
) -> tuple[nn.Module, list[dict]]:
    """Fine-tune ``student`` in place; returns it and the per-step loss terms.

    ``batches(step, generator)`` returns the clean images of a step (or a :class:`Batch` with the
    rows' conditioning), drawing any randomness from ``generator``. ``noise_scheduler`` is a
    diffusers training scheduler (``add_noise``). ``masks`` (module name -> 2:4 bool mask) keeps a
    sparse student sparse; under ``mask_mode="sr-ste"`` the dict is updated in place with the masks
    the training settled on. With ``ema_decay`` the returned weights are the EMA's.
    """
    return DistillTrainer(student, teacher, noise_scheduler, batches, config, checkpoint_dir, on_step, masks).train()


def config_dict(config: DistillConfig) -> dict:
    return asdict(config)
