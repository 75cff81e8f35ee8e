"""Distilling a small VAE decoder from the teacher's: the same latents in, the teacher's images as targets.

The data is the teacher pipeline's own latents (what a decoder sees at inference), augmented by the
eight flips and quarter turns of the latent grid, each decoded by the teacher's decoder on the fly, so
every target is exact. The loss is L1 + MSE on pixels ([-1, 1]): L1 keeps edges sharp, MSE is what PSNR
measures. AdamW with warm-up and cosine decay; each step draws its batch from a generator seeded by
the step, so a run is reproducible.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class DecoderDistillConfig:
    steps: int = 1000
    batch_size: int = 16
    lr: float = 2e-3
    warmup_steps: int = 50
    augment: bool = True  # flips and quarter turns of the latent grid
    seed: int = 0


def _lr_factor(step: int, steps: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def _augment(z: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """One of the eight symmetries of the square per sample (the latent grid is square)."""
    turns = torch.randint(0, 4, (len(z),), generator=gen)
    flips = torch.rand(len(z), generator=gen) < 0.5
    out = [torch.rot90(x.flip(-1) if f else x, int(k), dims=(-2, -1)) for x, k, f in zip(z, turns, flips)]
    return torch.stack(out)


def distill_decoder(student: nn.Module, teacher: Callable[[torch.Tensor], torch.Tensor], latents: torch.Tensor,
                    config: DecoderDistillConfig, on_step: Callable[[int, float], None] | None = None) -> list[float]:
    """Train ``student`` (latents -> image) to decode ``latents`` (what ``vae.decode`` receives) as ``teacher`` does.

    Returns the loss of every step; ``student`` is left in eval mode.
    """
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, config.steps, config.warmup_steps))
    losses = []
    student.train()
    for step in range(config.steps):
        gen = torch.Generator().manual_seed(config.seed * 1_000_003 + step)
        z = latents[torch.randint(0, len(latents), (config.batch_size,), generator=gen)]
        if config.augment:
            z = _augment(z, gen)
        with torch.no_grad():
            target = teacher(z)
        pred = student(z)
        loss = F.l1_loss(pred, target) + F.mse_loss(pred, target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if on_step is not None:
            on_step(step, losses[-1])
    student.eval()
    return losses
