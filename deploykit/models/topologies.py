"""Stable Diffusion topologies built from config: SD1.5 and SDXL at full size, and tiny test versions.

Random weights measure speed, never quality: a teacher built here is labelled ``random_weights`` in
every report. The full-size configs are those of runwayml/stable-diffusion-v1-5 and
stabilityai/stable-diffusion-xl-base-1.0; the tiny ones keep the same block types and conditioning
(cross-attention, GEGLU feed-forward, SDXL's text-time embedding) at test size.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

_SD15_UNET = {
    "sample_size": 64, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "block_out_channels": [320, 640, 1280, 1280],
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "cross_attention_dim": 768, "attention_head_dim": 8, "norm_num_groups": 32,
}
_SDXL_UNET = {
    "sample_size": 128, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "block_out_channels": [320, 640, 1280],
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "transformer_layers_per_block": [1, 2, 10], "attention_head_dim": [5, 10, 20], "cross_attention_dim": 2048,
    "use_linear_projection": True, "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816, "norm_num_groups": 32,
}
_TINY_SD_UNET = {
    "sample_size": 16, "in_channels": 4, "out_channels": 4, "layers_per_block": 1,
    "block_out_channels": [32, 64],
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "cross_attention_dim": 32, "attention_head_dim": 4, "norm_num_groups": 8,
}
_TINY_SDXL_UNET = {
    "sample_size": 16, "in_channels": 4, "out_channels": 4, "layers_per_block": 1,
    "block_out_channels": [32, 64],
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
    "transformer_layers_per_block": [1, 2], "attention_head_dim": [2, 4], "cross_attention_dim": 64,
    "use_linear_projection": True, "addition_embed_type": "text_time", "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 80, "norm_num_groups": 8,
}

_SD15_TEXT = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
              "hidden_act": "quick_gelu", "projection_dim": 768}
_SDXL_TEXT_2 = {"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32, "num_attention_heads": 20,
                "hidden_act": "gelu", "projection_dim": 1280}
_TINY_TEXT = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 4,
              "hidden_act": "quick_gelu", "projection_dim": 32}

_SD_VAE = {"block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "latent_channels": 4,
           "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
           "norm_num_groups": 32}
_TINY_VAE = {"block_out_channels": [16, 32], "layers_per_block": 1, "latent_channels": 4,
             "down_block_types": ["DownEncoderBlock2D"] * 2, "up_block_types": ["UpDecoderBlock2D"] * 2,
             "norm_num_groups": 8}

# name -> (kind, unet, text encoders, vae, vae scaling factor, default image side in pixels)
TOPOLOGIES: dict[str, dict] = {
    "sd15": {"kind": "sd", "unet": _SD15_UNET, "text": [_SD15_TEXT], "vae": _SD_VAE, "scaling_factor": 0.18215,
             "image_size": 512},
    "sdxl": {"kind": "sdxl", "unet": _SDXL_UNET, "text": [_SD15_TEXT, _SDXL_TEXT_2], "vae": _SD_VAE,
             "scaling_factor": 0.13025, "image_size": 1024},
    "tiny-sd": {"kind": "sd", "unet": _TINY_SD_UNET, "text": [_TINY_TEXT], "vae": _TINY_VAE, "scaling_factor": 0.18215,
                "image_size": 32},
    "tiny-sdxl": {"kind": "sdxl", "unet": _TINY_SDXL_UNET, "text": [_TINY_TEXT, {**_TINY_TEXT, "hidden_size": 32}],
                  "vae": _TINY_VAE, "scaling_factor": 0.13025, "image_size": 32},
}
SCHEDULER = {"num_train_timesteps": 1000, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
             "prediction_type": "epsilon", "steps_offset": 1, "clip_sample": False, "set_alpha_to_one": False}


def topology(name: str) -> dict:
    if name not in TOPOLOGIES:
        raise KeyError(f"unknown topology {name!r} (known: {', '.join(TOPOLOGIES)})")
    return TOPOLOGIES[name]


def unet_config(name: str) -> dict:
    return dict(topology(name)["unet"])


def build_unet(name: str, seed: int = 0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(**unet_config(name)).eval()


def build_tokenizer(folder: str | Path | None = None):
    """A byte-level CLIP tokenizer made here, with no merges: one token per byte.

    Real SD tokenizers are downloads; a tokenizer of our own keeps tests and random-weight builds
    offline. Its ids are a subset of every CLIP vocabulary's range, so it feeds any text encoder.
    """
    import tempfile

    from transformers import CLIPTokenizer
    from transformers.models.clip.tokenization_clip import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "vocab.json").write_text(json.dumps(vocab))
        (Path(tmp) / "merges.txt").write_text("#version: 0.2\n")
        tok = CLIPTokenizer(str(Path(tmp) / "vocab.json"), str(Path(tmp) / "merges.txt"), model_max_length=77,
                            pad_token="<|endoftext|>")
        if folder is not None:
            tok.save_pretrained(folder)
    return tok


def _text_encoder(cfg: dict, tokenizer, with_projection: bool):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **cfg)
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config).eval()


def build_pipeline(name: str, seed: int = 0, unet=None):
    """A whole SD / SDXL pipeline of the named topology with random weights (``unet`` replaces its UNet)."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    t = topology(name)
    unet = unet if unet is not None else build_unet(name, seed)
    torch.manual_seed(seed + 1)
    tokenizer = build_tokenizer()
    vae = AutoencoderKL(in_channels=3, out_channels=3, scaling_factor=t["scaling_factor"],
                        sample_size=t["image_size"], **t["vae"]).eval()
    scheduler = EulerDiscreteScheduler(**{k: v for k, v in SCHEDULER.items() if k not in ("clip_sample", "set_alpha_to_one")})
    if t["kind"] == "sd":
        return StableDiffusionPipeline(vae=vae, text_encoder=_text_encoder(t["text"][0], tokenizer, False),
                                       tokenizer=tokenizer, unet=unet, scheduler=scheduler, safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
    return StableDiffusionXLPipeline(vae=vae, text_encoder=_text_encoder(t["text"][0], tokenizer, False),
                                     text_encoder_2=_text_encoder(t["text"][1], tokenizer, True), tokenizer=tokenizer,
                                     tokenizer_2=build_tokenizer(), unet=unet, scheduler=scheduler)
