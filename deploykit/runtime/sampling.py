"""The sampling loop, independent of the backend that evaluates the UNet."""

from __future__ import annotations

from collections.abc import Callable

import torch

DenoiseFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (sample, timesteps) -> noise


def _scheduler_class(name: str):
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

    classes = {"ddim": DDIMScheduler, "dpm-solver++": DPMSolverMultistepScheduler, "euler": EulerDiscreteScheduler}
    if name not in classes:
        raise ValueError(f"unknown scheduler {name!r} (known: {', '.join(classes)})")
    return classes[name]


def make_pipeline_scheduler(name: str, pipeline_config: dict):
    """The named scheduler, configured from an SD pipeline's own scheduler config (betas, offsets).

    Where the config is silent (an Euler config has no ``clip_sample``), DDIM's defaults are those of
    latent diffusion, not DDIM's own: clipping the predicted x0 to [-1, 1] would clip SD latents.
    """
    return _scheduler_class(name).from_config({"clip_sample": False, "set_alpha_to_one": False, **pipeline_config})


# The keys of a scheduler config that describe how the model was trained: its noise schedule and what it
# predicts. A scheduler rebuilt from a teacher's config (for sampling, or for noising in recovery) keeps these.
TRAINED_SCHEDULE_KEYS = ("num_train_timesteps", "beta_schedule", "beta_start", "beta_end", "prediction_type",
                         "rescale_betas_zero_snr", "timestep_spacing")


def trained_schedule(config: dict) -> dict:
    return {k: v for k, v in config.items() if k in TRAINED_SCHEDULE_KEYS}


def make_scheduler(name: str, train_config: dict):
    """A diffusers scheduler for inference, configured like the one the model was trained with."""
    cls = _scheduler_class(name)
    kwargs = trained_schedule(train_config)
    if name == "ddim":
        kwargs.update(clip_sample=True, set_alpha_to_one=True)
    return cls(**kwargs)


@torch.no_grad()
def sample(denoise: DenoiseFn, scheduler, noise: torch.Tensor, steps: int,
           progress: Callable[[int], None] | None = None) -> torch.Tensor:
    """Run ``steps`` scheduler steps from ``noise``; deterministic for DDIM (eta 0).

    The same noise through teacher and student gives sample pairs that can be compared pixel by
    pixel (PSNR / SSIM to the teacher).
    """
    scheduler.set_timesteps(steps)
    x = noise * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        model_in = scheduler.scale_model_input(x, t)
        eps = denoise(model_in, t.expand(x.shape[0]).to(torch.int64))
        x = scheduler.step(eps, t, x).prev_sample
        if progress:
            progress(1)
    return x.clamp(-1, 1)


def sample_batched(denoise: DenoiseFn, scheduler, noise: torch.Tensor, steps: int, batch_size: int,
                   progress: Callable[[int], None] | None = None) -> torch.Tensor:
    return torch.cat([sample(denoise, scheduler, chunk, steps, progress) for chunk in noise.split(batch_size)])
