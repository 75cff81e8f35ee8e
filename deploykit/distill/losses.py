"""The DaKD loss terms, each a small function or module of tensors: no data, no training loop.

``total = denoise_weight * L_denoise + output_kd_weight * L_out + feature_kd_weight * L_feat
        + attention_kd_weight * L_attn + distribution_kd_weight * L_dist + adversarial_weight * L_adv``

- ``L_denoise = ||eps_s - eps||^2``: the plain denoising loss (Diff-Pruning's recovery).
- ``L_out = ||eps_s - eps_t||^2``: output knowledge distillation.
- ``L_feat``: :func:`normalized_feature_loss` over the UNet's block outputs (LAPTOP-Diff's normalised
  feature loss), student features passed through a learned :class:`ChannelProjection`.
- ``L_attn``: the same normalised loss on the outputs of every ``Attention`` module (see
  :mod:`deploykit.distill.taps` for what is tapped and why).
- ``L_dist``: :func:`distribution_kd_loss`, KL between the spatial softmaxes of teacher and student noise.
- ``L_adv``: :func:`generator_hinge_loss` of a :class:`Discriminator` trained with
  :func:`discriminator_hinge_loss` on its own optimizer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def normalized_feature_loss(student: torch.Tensor, teacher: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """``||f_s - f_t||^2 / ||f_t||^2`` per sample, averaged over the batch.

    Dividing by the teacher feature's own energy puts every tap on the same scale whatever its depth
    and width (LAPTOP-Diff's normalised feature distillation), so one weight serves all taps, and
    the loss of a tap is its relative error: 0 for a perfect match, 1 for a student that outputs zeros.
    """
    dims = tuple(range(1, teacher.dim()))
    diff = (student.float() - teacher.float()).pow(2).sum(dims)
    return (diff / (teacher.float().pow(2).sum(dims) + eps)).mean()


def distribution_kd_loss(eps_student: torch.Tensor, eps_teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``tau^2 * KL(softmax(eps_t / tau) || softmax(eps_s / tau))`` over the spatial positions of each channel.

    Each (sample, channel) noise map becomes a distribution over its H x W positions; the term asks
    the student to put its noise where the teacher puts it, whatever the per-channel offset (softmax
    ignores a constant shift). A lower ``tau`` sharpens both distributions and so weighs the largest
    values more; the ``tau^2`` factor keeps the gradient's scale comparable across temperatures
    (Hinton et al.'s convention). Averaged over samples and channels.
    """
    s = eps_student.float().flatten(2) / temperature
    t = eps_teacher.float().flatten(2) / temperature
    kl = F.kl_div(F.log_softmax(s, dim=-1), F.log_softmax(t, dim=-1), log_target=True, reduction="none").sum(-1)
    return kl.mean() * temperature ** 2


class ChannelProjection(nn.Module):
    """A learned 1x1 map from the student's channel width to the teacher's (FitNets' regressor).

    Works on feature maps ``(B, C, H, W)`` and token sequences ``(B, N, C)`` alike. Only built where
    the widths differ: a tap the pruning left at full width is compared directly.
    """

    def __init__(self, student_channels: int, teacher_channels: int):
        super().__init__()
        self.linear = nn.Linear(student_channels, teacher_channels, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4:
            return self.linear(x.movedim(1, -1)).movedim(-1, 1)
        return self.linear(x)


class Discriminator(nn.Module):
    """A small PatchGAN critic on a noise prediction, conditioned on its input ``x_t`` and timestep.

    It judges ``(x_t, eps_hat, t)``: is ``eps_hat`` the teacher's prediction for this input? We
    judge the noise rather than the implied ``x0 = (x_t - sigma_t * eps) / alpha_t``, which magnifies
    the prediction's error by ``sigma_t / alpha_t`` (about 150 at the last step of a linear schedule)
    so that the noisiest timesteps would drown the rest; ``eps`` has unit scale at every ``t``.
    Two stride-2 convolutions: patch logits at a quarter of the resolution, averaged.
    """

    def __init__(self, channels: int, width: int = 32, num_train_timesteps: int = 1000):
        super().__init__()
        self.num_train_timesteps = num_train_timesteps
        groups = 8 if width % 8 == 0 else 1
        self.net = nn.Sequential(
            nn.Conv2d(2 * channels + 1, width, 3, padding=1), nn.LeakyReLU(0.2),
            nn.Conv2d(width, 2 * width, 4, stride=2, padding=1), nn.GroupNorm(groups, 2 * width), nn.LeakyReLU(0.2),
            nn.Conv2d(2 * width, 2 * width, 4, stride=2, padding=1), nn.GroupNorm(groups, 2 * width), nn.LeakyReLU(0.2),
            nn.Conv2d(2 * width, 1, 3, padding=1),
        )

    def forward(self, x_t: torch.Tensor, eps: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        t = (timesteps.float() / self.num_train_timesteps).view(-1, 1, 1, 1).expand(-1, 1, *x_t.shape[2:])
        return self.net(torch.cat([x_t.float(), eps.float(), t.to(x_t.device)], dim=1)).flatten(1).mean(1)


def discriminator_hinge_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """The critic's hinge loss: teacher predictions above +1, student predictions below -1."""
    return F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean()


def generator_hinge_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """The student's side of the hinge GAN: raise the critic's score of its predictions."""
    return -fake_logits.mean()
