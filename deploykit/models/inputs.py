"""A UNet's input names and example inputs: shortcuts over :mod:`deploykit.models.io_spec`, which describes them.

Names follow optimum's ONNX layout (``sample``, ``timestep``, ``encoder_hidden_states``, and SDXL's
``text_embeds`` / ``time_ids``) so that exported graphs load in ``ORTStableDiffusionPipeline``.
"""

from __future__ import annotations

import torch

from deploykit.models.io_spec import TEXT_TOKENS, is_conditional, sample_size, unet_io, unet_of

__all__ = ["TEXT_TOKENS", "example_unet_inputs", "is_conditional", "sample_size", "unet_input_names", "unet_of"]


def unet_input_names(model_or_config) -> tuple[str, ...]:
    return unet_io(model_or_config).input_names()


def example_unet_inputs(model_or_config, batch: int, size: int | None = None, seed: int = 0,
                        num_train_timesteps: int = 1000, tokens: int = TEXT_TOKENS) -> tuple[torch.Tensor, ...]:
    """Random inputs for one UNet call, in :func:`unet_input_names` order; ``size`` is the latent/pixel side."""
    return unet_io(model_or_config).sample_input(batch, size, seed, num_train_timesteps, tokens)
