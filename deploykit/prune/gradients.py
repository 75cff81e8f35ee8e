"""Gradient loops for Taylor-type criteria: what the papers differ in is *which* loss, at *which*
timesteps, the gradients come from. Each factory takes the caller's data and returns a
``forward_loop(model)`` that accumulates gradients into ``.grad`` (the caller owns the data; the
loop only decides how to use it). Every loop is deterministic for a given seed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from deploykit.models.objectives import denoising_target

ForwardLoop = Callable[[nn.Module], None]


@dataclass
class GradientData:
    """Clean images from the teacher's data and the noise scheduler it was trained with.

    ``conditioning``: the UNet's inputs after (sample, timestep) for one sample, in
    :func:`deploykit.models.inputs.unet_input_names` order (SD: encoder_hidden_states; SDXL also
    text_embeds, time_ids); empty for pixel UNets. Block-removal calibration feeds it to SD UNets.
    """

    images: torch.Tensor
    noise_scheduler: object  # a diffusers training scheduler: add_noise, alphas_cumprod, config
    batch_size: int = 64
    batches: int = 4
    seed: int = 0
    conditioning: tuple[torch.Tensor, ...] = ()

    def fixed_batch(self, gen: torch.Generator) -> torch.Tensor:
        return self.images[torch.randint(0, len(self.images), (self.batch_size,), generator=gen)]

    def conditioning_for(self, batch: int) -> tuple[torch.Tensor, ...]:
        """``conditioning`` repeated for a batch of ``batch`` samples."""
        return tuple(c[:1].expand(batch, *c.shape[1:]) for c in self.conditioning)

    @property
    def num_timesteps(self) -> int:
        return self.noise_scheduler.config.num_train_timesteps


def _noised_batches(data: GradientData, gen: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``data.batches`` batches of (x_t, training target, t) at uniformly drawn timesteps."""
    for _ in range(data.batches):
        x0 = data.fixed_batch(gen)
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, data.num_timesteps, (len(x0),), generator=gen)
        yield data.noise_scheduler.add_noise(x0, noise, t), denoising_target(data.noise_scheduler, x0, noise, t), t


def random_timesteps(data: GradientData) -> ForwardLoop:
    """Plain Taylor: the training loss (denoising MSE) at uniformly drawn timesteps."""

    def loop(model: nn.Module) -> None:
        for xt, target, t in _noised_batches(data, torch.Generator().manual_seed(data.seed)):
            F.mse_loss(model(xt, t).sample, target).backward()

    return loop


def diff_pruning(data: GradientData, threshold: float = 0.05, stride: int = 1,
                 visited: list[tuple[int, float]] | None = None) -> ForwardLoop:
    """Diff-Pruning (Fang et al., NeurIPS 2023): one batch of clean images and one draw of noise,
    fixed; gradients of the denoising loss summed over t = 0, stride, 2*stride, ... and stopped at the
    first t whose loss falls under ``threshold`` x the largest loss seen (0.05 in their CIFAR-10
    setting): late, near-pure-noise steps carry little about the content and are left out.
    ``visited`` (optional) receives (t, loss) for each step taken.
    """

    def loop(model: nn.Module) -> None:
        gen = torch.Generator().manual_seed(data.seed)
        x0 = data.fixed_batch(gen)
        noise = torch.randn(x0.shape, generator=gen)
        loss_max = 0.0
        for step in range(0, data.num_timesteps, stride):
            t = torch.full((len(x0),), step, dtype=torch.long)
            target = denoising_target(data.noise_scheduler, x0, noise, t)
            loss = F.mse_loss(model(data.noise_scheduler.add_noise(x0, noise, t), t).sample, target)
            loss.backward()
            value = loss.item()
            if visited is not None:
                visited.append((step, value))
            loss_max = max(loss_max, value)
            if value < threshold * loss_max:
                break

    return loop


def nici_schedule(num_timesteps: int = 1000) -> list[int]:
    """NiCI's interval sampling: every 2nd step below 250, 4th to 500, 8th to 750, 16th to 1000
    (scaled to the scheduler's length)."""
    edges = [0, 250, 500, 750, 1000]
    scale = num_timesteps / 1000
    steps: list[int] = []
    for (lo, hi), stride in zip(zip(edges, edges[1:]), (2, 4, 8, 16)):
        steps += list(range(int(lo * scale), int(hi * scale), max(1, int(stride * scale))))
    return steps


def nici_weight(noise_scheduler, t: int) -> float:
    """Timestep weight that damps later timesteps.

    NiCI-Pruning (IEEE TIP 2025) weights each timestep's contribution so that late timesteps, whose
    clean-input predictions mislead, count less; the public code leaves the weighting out. Ours is
    the signal fraction at t, alpha-bar_t: 1 at t = 0, falling to ~0 at t = T.
    """
    return float(noise_scheduler.alphas_cumprod[t])


def nici(data: GradientData, visited: list[tuple[int, float]] | None = None) -> ForwardLoop:
    """NiCI-Pruning: feed *clean* images at timestep t; the noise the model predicts there is the
    "noise in the clean image", and its energy ||eps(x0, t)||^2 is the reconstruction loss (a clean
    input holds no noise to find). Gradients are summed over the interval schedule, each step
    weighted by ``nici_weight``. ``visited`` receives (t, weight) for each step taken.
    """

    def loop(model: nn.Module) -> None:
        gen = torch.Generator().manual_seed(data.seed)
        x0 = data.fixed_batch(gen)
        for step in nici_schedule(data.num_timesteps):
            weight = nici_weight(data.noise_scheduler, step)
            if visited is not None:
                visited.append((step, weight))
            t = torch.full((len(x0),), step, dtype=torch.long)
            (weight * model(x0, t).sample.pow(2).mean()).backward()

    return loop


def cap(data: GradientData, sigma: float = 0.1) -> ForwardLoop:
    """Content-aware pruning (our formulation of Comp-Diff's CAP; no public code exists).

    A unit matters for the content if the output reacts through it when the content changes. For
    noised inputs x_t at uniformly drawn timesteps we perturb the input, x_t + delta with
    delta ~ N(0, sigma^2), and take the induced change of the prediction,
    L = ||eps(x_t + delta, t) - sg[eps(x_t, t)]||^2 (sg: no gradient through the reference). Taylor
    scores sum_i |w_i dL/dw_i| over these gradients rank units by how much of that response flows
    through them. With sigma = 0 the loss and every score are 0.
    """

    def loop(model: nn.Module) -> None:
        gen = torch.Generator().manual_seed(data.seed)
        for xt, _, t in _noised_batches(data, gen):
            delta = sigma * torch.randn(xt.shape, generator=gen)
            with torch.no_grad():
                reference = model(xt, t).sample
            F.mse_loss(model(xt + delta, t).sample, reference, reduction="sum").div(len(xt)).backward()

    return loop
