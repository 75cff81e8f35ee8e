"""A smaller VAE decoder for a Stable Diffusion pipeline: a TAESD-style tiny decoder in place of the KL decoder.

The tiny decoder is diffusers' ``DecoderTiny`` (the decoder of ``AutoencoderTiny``, TAESD's design:
plain 3x3 convolutions in residual blocks, nearest-neighbour upsampling, no attention and no
normalisation), distilled from the teacher's decoder (:mod:`deploykit.distill.decoder`). It takes the
place of ``vae.decoder`` inside the pipeline's ``AutoencoderKL``, with ``post_quant_conv`` folded away,
so that ``vae.decode(latents / scaling_factor)`` keeps its meaning everywhere: the diffusers pipelines,
the ONNX ``vae_decoder`` graph (same inputs, outputs and ``config.json``), optimum, the runtime and
the device bundle all see the same interface as before.

Saved as ``decoder.safetensors`` and ``decoder.json`` (the ``DecoderTiny`` settings and the latent
scaling factor): no pickle, nothing imported by name. Imported by the runtime: torch and diffusers only.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from deploykit.errors import InputError
from deploykit.io import atomic_write_json, load_tensors, save_tensors
from deploykit.paths import OutsideFolder, inside

WEIGHTS = "decoder.safetensors"
CONFIG = "decoder.json"
KIND = "tiny"


class TinyDecoder(nn.Module):
    """``latents / scaling_factor`` (what ``vae.decoder`` receives) -> image in [-1, 1].

    ``DecoderTiny`` expects latents at unit scale (it softly clamps them to +-3), so the scaling factor
    ``vae.decode`` divided out is multiplied back in first.
    """

    def __init__(self, latent_channels: int, block_out_channels: list[int], num_blocks: list[int],
                 scaling_factor: float, out_channels: int = 3):
        super().__init__()
        from diffusers.models.autoencoders.vae import DecoderTiny

        self.settings = {"kind": KIND, "latent_channels": latent_channels, "block_out_channels": list(block_out_channels),
                         "num_blocks": list(num_blocks), "scaling_factor": scaling_factor, "out_channels": out_channels}
        self.scaling_factor = scaling_factor
        self.decoder = DecoderTiny(in_channels=latent_channels, out_channels=out_channels, num_blocks=tuple(num_blocks),
                                   block_out_channels=tuple(block_out_channels), upsampling_scaling_factor=2,
                                   act_fn="relu", upsample_fn="nearest")

    def forward(self, z: torch.Tensor, latent_embeds: torch.Tensor | None = None) -> torch.Tensor:
        return self.decoder(z * self.scaling_factor)


def tiny_decoder_for(vae: nn.Module, block_out_channels: list[int], num_blocks: list[int]) -> TinyDecoder:
    """A tiny decoder with as many upsamplings as ``vae``'s decoder has (one level per block width)."""
    levels = len(vae.config.block_out_channels)
    if len(block_out_channels) != levels or len(num_blocks) != levels:
        raise ValueError(f"the VAE decoder has {levels} levels (upsampling x{2 ** (levels - 1)}): give as many block widths "
                         f"and block counts, not {len(block_out_channels)} and {len(num_blocks)}")
    return TinyDecoder(vae.config.latent_channels, block_out_channels, num_blocks, float(vae.config.scaling_factor),
                       vae.config.out_channels)


def save_decoder(decoder: TinyDecoder, folder: str | Path) -> None:
    folder = Path(folder)
    save_tensors(folder / WEIGHTS, decoder.state_dict(), metadata={"format": "pt"})
    atomic_write_json(folder / CONFIG, decoder.settings)


def load_decoder(folder: str | Path) -> TinyDecoder:
    """The decoder saved in ``folder``; InputError on a missing, malformed or mismatched file."""
    folder = Path(folder)
    for name in (CONFIG, WEIGHTS):
        try:
            if not inside(folder, name).is_file():
                raise InputError(f"not a decoder folder: {folder / name} is missing")
        except OutsideFolder as e:
            raise InputError(f"{folder}: {e}") from None
    try:
        settings = json.loads((folder / CONFIG).read_text())
        if settings.get("kind") != KIND:
            raise InputError(f"{folder / CONFIG}: decoder kind {settings.get('kind')!r} (known: {KIND})")
        decoder = TinyDecoder(int(settings["latent_channels"]), [int(c) for c in settings["block_out_channels"]],
                              [int(n) for n in settings["num_blocks"]], float(settings["scaling_factor"]),
                              int(settings.get("out_channels", 3)))
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise InputError(f"{folder / CONFIG}: not a decoder description ({e})") from None
    try:
        decoder.load_state_dict(load_tensors(folder / WEIGHTS))
    except RuntimeError as e:
        raise InputError(f"{folder / WEIGHTS}: weights do not fit {CONFIG}: {str(e).splitlines()[-1].strip()}") from None
    return decoder.eval()


def put_decoder(vae: nn.Module, decoder: nn.Module) -> nn.Module:
    """``vae`` (an AutoencoderKL) decoding with ``decoder``; ``post_quant_conv`` is the decoder's business now."""
    vae.decoder = decoder
    vae.post_quant_conv = nn.Identity()
    return vae


def use_decoder(vae: nn.Module, folder: str | Path) -> nn.Module:
    """``vae`` with the decoder saved in ``folder`` (a decoder stage's output) in place of its own."""
    decoder = load_decoder(folder)
    param = next(vae.parameters())
    return put_decoder(vae, decoder.to(param.device, param.dtype))
