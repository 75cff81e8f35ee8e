"""What a UNet takes: input names in positional order, and example inputs of the right shapes.

Names follow optimum's ONNX layout (``sample``, ``timestep``, ``encoder_hidden_states``, and SDXL's
``text_embeds`` / ``time_ids``) so that exported graphs load in ``ORTStableDiffusionPipeline``.
"""

from __future__ import annotations

import torch
from torch import nn

PIXEL_INPUTS = ("sample", "timestep")
SD_INPUTS = ("sample", "timestep", "encoder_hidden_states")
SDXL_INPUTS = SD_INPUTS + ("text_embeds", "time_ids")
TEXT_TOKENS = 77  # CLIP's context length: what SD pipelines feed the UNet


def _config(model_or_config) -> dict:
    if isinstance(model_or_config, dict):
        return model_or_config
    unet = getattr(model_or_config, "unet", model_or_config)  # TensorOutput or the UNet itself
    return dict(unet.config)


def is_conditional(model_or_config) -> bool:
    return _config(model_or_config).get("cross_attention_dim") is not None


def unet_input_names(model_or_config) -> tuple[str, ...]:
    c = _config(model_or_config)
    if not is_conditional(c):
        return PIXEL_INPUTS
    return SDXL_INPUTS if c.get("addition_embed_type") == "text_time" else SD_INPUTS


def sample_size(model_or_config) -> int:
    size = _config(model_or_config)["sample_size"]
    return size if isinstance(size, int) else size[0]


def example_unet_inputs(model_or_config, batch: int, size: int | None = None, seed: int = 0,
                        num_train_timesteps: int = 1000, tokens: int = TEXT_TOKENS) -> tuple[torch.Tensor, ...]:
    """Random inputs for one UNet call, in :func:`unet_input_names` order; ``size`` is the latent/pixel side."""
    c = _config(model_or_config)
    size = size or sample_size(c)
    gen = torch.Generator().manual_seed(seed)
    inputs = [torch.randn(batch, c["in_channels"], size, size, generator=gen),
              torch.randint(0, num_train_timesteps, (batch,), generator=gen)]
    if is_conditional(c):
        # SD pipelines call the UNet with one timestep for the whole batch (both guidance halves)
        inputs[1] = inputs[1][:1].expand(batch).clone()
        inputs.append(torch.randn(batch, tokens, c["cross_attention_dim"], generator=gen))
        if c.get("addition_embed_type") == "text_time":
            time_ids_dim = 6  # (original h, w, crop top, left, target h, w)
            text_embeds_dim = c["projection_class_embeddings_input_dim"] - time_ids_dim * c["addition_time_embed_dim"]
            inputs.append(torch.randn(batch, text_embeds_dim, generator=gen))
            side = size * 8  # latent to pixels through the SD VAE
            inputs.append(torch.tensor([[side, side, 0, 0, side, side]], dtype=torch.float32).expand(batch, 6).clone())
    return tuple(inputs)


def unet_of(model: nn.Module) -> nn.Module:
    return getattr(model, "unet", model)
