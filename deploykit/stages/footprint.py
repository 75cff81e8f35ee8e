"""What a build's stages hold in memory, estimated from the recipe before anything runs.

A stage's ``memory`` hook returns its :class:`Demand` s: products of its settings (batch x resolution,
samples x resolution, ...) with the sizes of one sample, one image and one UNet call that a
:class:`Footprint` works out from the teacher's config, with no weights loaded. Before a build writes
anything, :func:`check_memory` refuses one whose stage would hold more than this machine's memory
(exit 2, naming the settings and the estimate).

The estimate is a floor, in float32: the buffers a stage keeps (samples, images, calibration data) and
the activations of one UNet call: the down path's outputs, which the up path holds for its skip
connections, a block's working tensors at the widest level and, where ONNX Runtime runs the graph,
the largest attention's score matrix (batch x heads x tokens^2, which it materializes; torch's fused
attention does not); for training, the activations torch keeps for the backward pass (:data:`SAVED_PER_RESNET`,
:data:`SAVED_PER_TRANSFORMER`). Weights, the allocator's slack and the libraries' own buffers come on top: a
build under the estimate may still run out of memory; one over it cannot fit. See docs/recipes.md.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deploykit.errors import InputError

FLOAT = 4  # bytes of a float32
# What a training step keeps for its backward pass, in floats per channel and pixel of each resnet and each
# cross-attention transformer layer (down and up path). Measured with torch.autograd.graph.saved_tensors_hooks
# (parameters left out) on zoo:digits, tiny-sd and SD1.5: the estimate is 85-98% of what torch kept.
SAVED_PER_RESNET = 11
SAVED_PER_TRANSFORMER = 30
TEXT_TOKENS = 77  # CLIP's context: a Stable Diffusion prompt's conditioning rows
SD_LATENT_CHANNELS, SD_VAE_SCALE, SD_VAE_WIDTH = 4, 8, 128  # SD / SDXL's VAE: 4 latent channels, /8, 128 at full size


@dataclass(frozen=True)
class Demand:
    """Memory a stage holds at once: ``fields`` the settings whose product it is, ``what`` what is held."""

    fields: str
    bytes: int
    what: str


@dataclass(frozen=True)
class Footprint:
    """One sample's sizes for a build's teacher, and the recipe (for settings a stage reads from other stages)."""

    recipe: Any
    sample: tuple[int, int, int]  # the UNet's input (channels, height, width)
    side: int  # image side in pixels
    pipeline: bool  # Stable Diffusion: text conditioning, a VAE
    dataset: bool  # the teacher brings its training images (zoo teachers)
    text_width: int = 0  # width of a prompt's conditioning rows (SD)
    unet: dict | None = None  # the UNet's config, where known: the activations are estimated from it

    @property
    def sample_bytes(self) -> int:
        c, h, w = self.sample
        return c * h * w * FLOAT

    @property
    def cond_bytes(self) -> int:
        """A prompt's conditioning (SD): 77 rows of the text encoder's width."""
        return TEXT_TOKENS * self.text_width * FLOAT

    @property
    def image_bytes(self) -> int:
        return 3 * self.side * self.side * FLOAT

    def unet_call(self, batch: int, materialized_attention: bool = False) -> int:
        """Activations of one UNet call on ``batch`` samples (see the module's docstring); 0 where the UNet is unknown."""
        if self.unet is None:
            return 0
        cfg, h = self.unet, self.sample[1]
        widths = list(cfg["block_out_channels"])
        per_level = _per_level(cfg.get("layers_per_block", 2), len(widths))
        skips = sum((per_level[i] + 1) * c * (h >> i) ** 2 for i, c in enumerate(widths))
        working = 4 * widths[0] * h * h
        scores = max((heads * ((h >> i) ** 2) ** 2 for i, heads in _attention_levels(cfg, widths)), default=0)
        return batch * (skips + working + (scores if materialized_attention else 0)) * FLOAT

    def training_step(self, batch: int) -> int:
        """Activations a training step on ``batch`` samples keeps for its backward pass; 0 where the UNet is unknown."""
        if self.unet is None:
            return 0
        cfg, h = self.unet, self.sample[1]
        widths = list(cfg["block_out_channels"])
        per_level = _per_level(cfg.get("layers_per_block", 2), len(widths))
        layers = _per_level(cfg.get("transformer_layers_per_block", 1), len(widths))
        saved = 0
        for i, (c, kind) in enumerate(zip(widths, cfg.get("down_block_types", ()))):
            resnets = 2 * per_level[i] + 1  # the down block's and the up block's (which has one more)
            per_resnet = SAVED_PER_RESNET + (SAVED_PER_TRANSFORMER * layers[i] if "CrossAttn" in kind else 0)
            saved += resnets * per_resnet * c * (h >> i) ** 2
        return batch * saved * FLOAT

    def vae_decode(self) -> int:
        """Activations of decoding one image (SD): a few feature maps of the VAE's full-size width."""
        return 4 * SD_VAE_WIDTH * self.side * self.side * FLOAT if self.pipeline else 0


def _per_level(value, levels: int) -> list[int]:
    return list(value) if isinstance(value, (list, tuple)) else [value] * levels


def _attention_levels(cfg: dict, widths: list[int]) -> list[tuple[int, int]]:
    """(level, heads) of the down path's levels with attention. diffusers' conditional UNets name the head count
    ``attention_head_dim`` (or ``num_attention_heads``); UNet2DModel's is the width of a head (None: one head)."""
    conditional = "cross_attention_dim" in cfg
    out = []
    for i, kind in enumerate(cfg.get("down_block_types", ())):
        if "Attn" not in kind:
            continue
        if conditional:
            heads = _per_level(cfg.get("num_attention_heads") or cfg.get("attention_head_dim") or 8, len(widths))[i]
        else:
            head_dim = cfg.get("attention_head_dim")
            heads = widths[i] // head_dim if head_dim else 1
        out.append((i, heads))
    return out


def _read_config(path: Path) -> dict | None:
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) else None


def _pipeline(recipe, unet: dict | None, scale: int, default_side: int) -> Footprint:
    side = recipe.resolution or default_side
    if side % (scale * 8):
        raise InputError(f"resolution {side} is not a multiple of {scale * 8} (the VAE's factor {scale} times 8)")
    channels = (unet or {}).get("in_channels", SD_LATENT_CHANNELS)
    width = (unet or {}).get("cross_attention_dim", 768)
    return Footprint(recipe, (channels, side // scale, side // scale), side, pipeline=True, dataset=False,
                     text_width=width if isinstance(width, int) else max(width), unet=unet)


def _pixel(recipe, unet: dict, dataset: bool) -> Footprint:
    size = unet.get("sample_size", 32)
    size = size if isinstance(size, int) else size[0]
    return Footprint(recipe, (unet.get("in_channels", 3), size, size), size, pipeline=False, dataset=dataset, unet=unet)


def footprint(recipe, recipe_dir: Path) -> Footprint:
    """The sizes of this build's teacher, from its spec (run after the teacher's own preflight has checked it)."""
    from deploykit.models.teacher import teacher_path

    spec: str = recipe.teacher
    if spec.startswith("zoo:"):
        from deploykit.zoo import get_entry

        entry = get_entry(spec.removeprefix("zoo:"))
        return _pixel(recipe, entry.unet_config, dataset=entry.dataset is not None)
    if spec.startswith(("random:", "hf:")):
        from deploykit.models.diffusers_pipelines import KNOWN_HUB_TOPOLOGIES
        from deploykit.models.topologies import topology

        name = spec.removeprefix("random:") if spec.startswith("random:") else (
            recipe.topology or KNOWN_HUB_TOPOLOGIES.get(spec.removeprefix("hf:").partition("@")[0]))
        if name is None:  # a hub model of unknown shape: its buffers are counted, not its activations
            return _pipeline(recipe, None, SD_VAE_SCALE, 512)
        topo = topology(name)
        return _pipeline(recipe, topo["unet"], 2 ** (len(topo["vae"]["block_out_channels"]) - 1), topo["image_size"])
    path = teacher_path(spec, recipe_dir)
    if (path / "model_index.json").is_file():
        unet = _read_config(path / "unet" / "config.json")
        vae = _read_config(path / "vae" / "config.json") or {}
        scale = 2 ** (len(vae.get("block_out_channels", [0] * 4)) - 1)
        size = (unet or {}).get("sample_size", 64)
        return _pipeline(recipe, unet, scale, (size if isinstance(size, int) else size[0]) * scale)
    unet = _read_config(path / "config.json") or _read_config(path / "unet" / "config.json") or {}
    return _pixel(recipe, unet, dataset=False)


def machine_memory() -> int:
    """This machine's memory in bytes: its RAM, or the container's limit where that is lower (cgroup v2 / v1)."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for limit in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            value = Path(limit).read_text().strip()
        except OSError:
            continue
        if value.isdigit():
            total = min(total, int(value))
    return total


def gib(n: int) -> str:
    return f"{n / 2**30:,.1f} GiB"


def check_memory(plan: list, footprint: Footprint, where: str, budget: int | None = None) -> dict[str, int]:
    """Each planned stage's estimate in bytes; InputError for the first over ``budget`` (default: this machine's
    memory), naming the settings behind its largest demand."""
    budget = machine_memory() if budget is None else budget
    estimates = {}
    for spec, config in plan:
        if spec.memory is None:
            continue
        demands = [d for d in spec.memory(config, footprint) if d.bytes > 0]
        total = estimates[spec.name] = sum(d.bytes for d in demands)
        if total > budget:
            worst = max(demands, key=lambda d: d.bytes)
            raise InputError(f"{where}: {worst.fields}: the {spec.name} stage would hold at least {gib(total)} "
                             f"({worst.what}: {gib(worst.bytes)}), more than this machine's {gib(budget)} of memory; "
                             f"lower {worst.fields.split(' x ')[0]}")
    return estimates
