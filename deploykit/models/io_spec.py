"""One description of what each component of a diffusion model takes and gives.

In the manner of TensorRT's diffusion demo (``demo/Diffusion/models.py``, a class per model with
``get_input_names`` / ``get_output_names`` / ``get_dynamic_axes`` / ``get_sample_input`` /
``get_input_profile``): a class per component, built from its diffusers or transformers config, whose
inputs and outputs are :class:`TensorSpec` rows with named dynamic axes. The rest is read off those rows:

- export: input and output names, dynamic axes, sample inputs, the inputs an fp16 graph keeps fp32;
- calibration and the runtime: a diffusers UNet call as named inputs (:meth:`UNetIO.named_inputs`);
- the engine stage and the bundle: TensorRT optimization profiles (:meth:`ComponentIO.input_profile`);
- the bundle: what ``bundle.json`` tells the device scripts about each tensor (:meth:`ComponentIO.feeds`:
  its role, and the value of a constant such as SDXL's ``time_ids``).

Names follow optimum's ONNX layout (``sample``, ``timestep``, ``encoder_hidden_states``, SDXL's
``text_embeds`` / ``time_ids``; ``input_ids`` -> ``last_hidden_state``; ``latent_sample`` -> ``sample``),
so that exported folders load in optimum's ORT pipelines. Axes: ``batch`` (rows of one call),
``height`` / ``width`` (the UNet's latent or pixel side; the image side at the VAE),
``latent_height`` / ``latent_width`` and ``sequence`` (text tokens).

Profiles are asked in the UNet's terms, ``batch`` = rows of one UNet call and ``side`` = its latent
side, because that is what a recipe sets: in a Stable Diffusion pipeline the text encoder runs once on
the UNet call's rows (negative and positive prompts together) and the VAE decodes one image per
classifier-free guidance pair.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Union

import torch
from torch import nn

from deploykit.errors import DeployKitError, InputError

Dim = Union[int, str]  # a fixed size, or the name of a dynamic axis
Range = tuple[int, int, int]  # min, opt, max

TEXT_TOKENS = 77  # CLIP's context length: what SD pipelines feed the UNet
# Image side / latent side of the SD and SDXL VAEs; used only where no VAE config is at hand
# (:func:`vae_scale_factor` reads it off a config)
LATENT_SCALE = 8


def unet_of(model: nn.Module) -> nn.Module:
    return getattr(model, "unet", model)  # TensorOutput or the UNet itself


def config_dict(model_or_config) -> dict:
    """A component's config as a dict, from the module, its config object, or a dict."""
    if isinstance(model_or_config, dict):
        return model_or_config
    if isinstance(model_or_config, nn.Module):
        model_or_config = unet_of(model_or_config).config
    to_dict = getattr(model_or_config, "to_dict", None)
    return to_dict() if callable(to_dict) else dict(model_or_config)


def is_conditional(model_or_config) -> bool:
    return config_dict(model_or_config).get("cross_attention_dim") is not None


def sample_size(model_or_config) -> int:
    size = config_dict(model_or_config)["sample_size"]
    return size if isinstance(size, int) else size[0]


def vae_scale_factor(vae_config) -> int:
    """Image side / latent side: the VAE halves the side once per down block but the last."""
    return 2 ** (len(config_dict(vae_config)["block_out_channels"]) - 1)


@dataclass(frozen=True)
class TensorSpec:
    """One input or output: its name, dims (ints or axis names), dtype and role.

    ``role`` says what the tensor is, for code that feeds a graph without knowing its names (the device
    scripts): ``sample``, ``timestep``, ``text``, ``pooled_text``, ``time_ids``, ``noise``, ``tokens``,
    ``hidden_state``, ``latent``, ``image``, ``latent_parameters``.
    """

    name: str
    dims: tuple[Dim, ...]
    role: str
    dtype: torch.dtype = torch.float32

    def shape(self, sizes: Mapping[str, int]) -> tuple[int, ...]:
        return tuple(d if isinstance(d, int) else sizes[d] for d in self.dims)


def _check_range(axis: str, r: Range) -> Range:
    lo, opt, hi = r
    if not 1 <= lo <= opt <= hi:
        raise InputError(f"engine profile: {axis} needs 1 <= min <= opt <= max, got {lo}, {opt}, {hi}")
    return r


class ComponentIO:
    """A component's inputs and outputs; subclasses list them in :meth:`inputs` and :meth:`outputs`."""

    name = ""  # the component's folder in optimum's layout
    fp32_inputs: tuple[str, ...] = ()  # inputs an fp16 graph keeps fp32, with their path to the first MatMul/Conv

    def inputs(self) -> tuple[TensorSpec, ...]:
        raise NotImplementedError

    def outputs(self) -> tuple[TensorSpec, ...]:
        raise NotImplementedError

    def input_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.inputs())

    def output_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.outputs())

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """torch.onnx's ``dynamic_axes``: tensor name -> {dim index: axis name}, inputs and outputs."""
        axes = {}
        for t in self.inputs() + self.outputs():
            named = {i: d for i, d in enumerate(t.dims) if isinstance(d, str)}
            if named:
                axes[t.name] = named
        return axes

    def axis_ranges(self, batch: Range, side: Range) -> dict[str, Range]:
        """min / opt / max of each dynamic axis, for UNet calls of ``batch`` rows on ``side`` x ``side`` latents."""
        raise NotImplementedError

    def input_profile(self, batch: Range, side: Range) -> dict[str, tuple[tuple[int, ...], ...]]:
        """TensorRT's optimization profile: input name -> (min, opt, max) shapes; a 0-d input gets empty shapes."""
        ranges = {axis: _check_range(axis, r) for axis, r in self.axis_ranges(batch, side).items()}
        return {t.name: tuple(t.shape({axis: r[i] for axis, r in ranges.items()}) for i in range(3)) for t in self.inputs()}

    def constants(self, image_side: int) -> dict[str, list[float]]:
        """Inputs whose value is fixed by the image size rather than drawn (one row, repeated along the batch)."""
        return {}

    def feeds(self, batch: Range, side: Range, image_side: int) -> list[dict]:
        """Each input at the profile's opt shape with its role (and value, for a constant): what a device script
        needs to feed the graph without knowing its names."""
        opt = {name: shapes[1] for name, shapes in self.input_profile(batch, side).items()}
        constants = self.constants(image_side)
        return [{"name": t.name, "shape": list(opt[t.name]), "role": t.role,
                 **({"value": constants[t.name]} if t.name in constants else {})} for t in self.inputs()]

    def check_graph(self, graph_dims: Mapping[str, Sequence[Dim]], where: str) -> None:
        """Raise when an ONNX graph's inputs (name -> dims, :func:`deploykit.onnxtools.graph_signature`'s) are not
        the ones described here, in name, order or rank."""
        ours = [(t.name, len(t.dims)) for t in self.inputs()]
        theirs = [(name, len(dims)) for name, dims in graph_dims.items()]
        if ours != theirs:
            raise DeployKitError(f"{where}: the graph's inputs {theirs} are not the {self.name}'s as described {ours}")


# ----------------------------------------------------------------------------------------------
# UNets


class UNetIO(ComponentIO):
    """A UNet: ``sample`` and ``timestep`` in, ``out_sample`` out (subclasses add the conditioning).

    ``scalar_timestep``: one timestep for the whole batch, a 0-d input (optimum's layout); otherwise one per row.
    """

    name = "unet"
    fp32_inputs = ("timestep",)
    timestep_dtype = torch.int64

    def __init__(self, config, scalar_timestep: bool = False):
        self.config = config_dict(config)
        self.scalar_timestep = scalar_timestep

    def inputs(self) -> tuple[TensorSpec, ...]:
        c = self.config
        return (TensorSpec("sample", ("batch", c["in_channels"], "height", "width"), "sample"),
                TensorSpec("timestep", () if self.scalar_timestep else ("batch",), "timestep", self.timestep_dtype))

    def outputs(self) -> tuple[TensorSpec, ...]:
        return (TensorSpec("out_sample", ("batch", self.config["out_channels"], "height", "width"), "noise"),)

    def axis_ranges(self, batch: Range, side: Range) -> dict[str, Range]:
        return {"batch": batch, "height": side, "width": side, "sequence": (TEXT_TOKENS,) * 3}

    def sample_input(self, batch: int, side: int | None = None, seed: int = 0, num_train_timesteps: int = 1000,
                     tokens: int = TEXT_TOKENS, image_side: int | None = None) -> tuple[torch.Tensor, ...]:
        """Random inputs for one call as torch takes them, in :meth:`input_names` order: ``side`` is the latent
        (or pixel) side, timesteps are int64 and one per row (:meth:`export_inputs` makes them what the graph takes)."""
        side = side or sample_size(self.config)
        gen = torch.Generator().manual_seed(seed)
        sample = torch.randn(batch, self.config["in_channels"], side, side, generator=gen)
        timestep = self._call_timesteps(torch.randint(0, num_train_timesteps, (batch,), generator=gen))
        return (sample, timestep) + self._conditioning(batch, gen, tokens, image_side or side * LATENT_SCALE)

    def _call_timesteps(self, timesteps: torch.Tensor) -> torch.Tensor:
        return timesteps

    def _conditioning(self, batch: int, gen: torch.Generator, tokens: int, image_side: int) -> tuple[torch.Tensor, ...]:
        return ()

    def export_inputs(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Sample inputs as the graph takes them: the timestep in its dtype and form, floats fp32."""
        if len(inputs) != len(self.inputs()):
            raise ValueError(f"{type(self).__name__} takes {len(self.inputs())} inputs {list(self.input_names())}, "
                             f"got {len(inputs)}")
        args = list(inputs)
        t = torch.as_tensor(args[1]).to(self.timestep_dtype)
        if t.dim() > 1:
            raise ValueError(f"timestep must be 0-d or 1-d, got shape {tuple(t.shape)}")
        args[1] = t[0] if self.scalar_timestep and t.dim() == 1 else t
        return [a.float() if a.is_floating_point() else a for a in args]

    def named_inputs(self, args: Sequence, kwargs: Mapping) -> dict[str, torch.Tensor]:
        """A diffusers UNet call (``sample, timestep, encoder_hidden_states=..., added_cond_kwargs={text_embeds,
        time_ids}``, as pipelines make it) as this description's inputs, the timestep one per row."""
        positional = ("sample", "timestep", "encoder_hidden_states")  # diffusers' forward signature
        values = dict(zip(positional, args))
        values.update({k: v for k, v in kwargs.items() if k in positional})
        values.update(kwargs.get("added_cond_kwargs") or {})
        t = torch.as_tensor(values["timestep"])
        values["timestep"] = t.expand(values["sample"].shape[0]) if t.dim() == 0 else t
        return {name: torch.as_tensor(values[name]) for name in self.input_names()}


class PixelUNetIO(UNetIO):
    """An unconditional pixel-space UNet (diffusers' UNet2DModel): an int64 timestep per row."""


class SDUNetIO(UNetIO):
    """A Stable Diffusion 1.x / 2.x UNet: text conditioning, a float32 timestep (as optimum exports it and as
    schedulers such as Euler produce it)."""

    timestep_dtype = torch.float32

    def inputs(self) -> tuple[TensorSpec, ...]:
        return super().inputs() + (
            TensorSpec("encoder_hidden_states", ("batch", "sequence", self.config["cross_attention_dim"]), "text"),)

    def _call_timesteps(self, timesteps: torch.Tensor) -> torch.Tensor:
        # SD pipelines call the UNet with one timestep for the whole batch (both guidance halves)
        return timesteps[:1].expand(len(timesteps)).clone()

    def _conditioning(self, batch: int, gen: torch.Generator, tokens: int, image_side: int) -> tuple[torch.Tensor, ...]:
        return (torch.randn(batch, tokens, self.config["cross_attention_dim"], generator=gen),)


class SDXLUNetIO(SDUNetIO):
    """An SDXL UNet: also the pooled text embedding and the size / crop conditioning ``time_ids``."""

    fp32_inputs = ("timestep", "time_ids")
    TIME_IDS = 6  # original height, width; crop top, left; target height, width

    @staticmethod
    def time_ids(height: int, width: int) -> list[float]:
        """SDXL's size and crop conditioning for an uncropped image generated at its own size (as its pipeline
        makes it by default)."""
        return [float(height), float(width), 0.0, 0.0, float(height), float(width)]

    @property
    def text_embeds_dim(self) -> int:
        c = self.config
        return c["projection_class_embeddings_input_dim"] - self.TIME_IDS * c["addition_time_embed_dim"]

    def inputs(self) -> tuple[TensorSpec, ...]:
        return super().inputs() + (TensorSpec("text_embeds", ("batch", self.text_embeds_dim), "pooled_text"),
                                   TensorSpec("time_ids", ("batch", self.TIME_IDS), "time_ids"))

    def constants(self, image_side: int) -> dict[str, list[float]]:
        return {"time_ids": self.time_ids(image_side, image_side)}

    def _conditioning(self, batch: int, gen: torch.Generator, tokens: int, image_side: int) -> tuple[torch.Tensor, ...]:
        hidden = super()._conditioning(batch, gen, tokens, image_side)
        text_embeds = torch.randn(batch, self.text_embeds_dim, generator=gen)
        time_ids = torch.tensor([self.time_ids(image_side, image_side)]).expand(batch, self.TIME_IDS).clone()
        return hidden + (text_embeds, time_ids)


def unet_io(model_or_config, scalar_timestep: bool = False) -> UNetIO:
    """The description of a UNet (UNet2DModel, SD or SDXL UNet2DConditionModel) from the module or its config."""
    c = config_dict(model_or_config)
    if not is_conditional(c):
        return PixelUNetIO(c, scalar_timestep)
    cls = SDXLUNetIO if c.get("addition_embed_type") == "text_time" else SDUNetIO
    return cls(c, scalar_timestep)


# ----------------------------------------------------------------------------------------------
# text encoders and the VAE


class CLIPTextIO(ComponentIO):
    """A CLIP text encoder as optimum exports it: ``input_ids`` in; ``last_hidden_state`` and ``pooler_output``
    out, or ``text_embeds`` first for the projection model (SDXL's ``text_encoder_2``); every layer's hidden
    state after them where the pipeline reads those (SDXL)."""

    def __init__(self, config, name: str = "text_encoder", with_projection: bool = False, hidden_states: bool = False):
        self.config = config_dict(config)
        self.name, self.with_projection, self.hidden_states = name, with_projection, hidden_states

    def inputs(self) -> tuple[TensorSpec, ...]:
        return (TensorSpec("input_ids", ("batch", "sequence"), "tokens", torch.int64),)

    def outputs(self) -> tuple[TensorSpec, ...]:
        c = self.config
        hidden = TensorSpec("last_hidden_state", ("batch", "sequence", c["hidden_size"]), "text")
        if self.with_projection:
            first = (TensorSpec("text_embeds", ("batch", c["projection_dim"]), "pooled_text"), hidden)
        else:
            first = (hidden, TensorSpec("pooler_output", ("batch", c["hidden_size"]), "pooled_text"))
        layers = tuple(TensorSpec(f"hidden_states.{i}", ("batch", "sequence", c["hidden_size"]), "hidden_state")
                       for i in range(c["num_hidden_layers"] + 1)) if self.hidden_states else ()
        return first + layers

    def axis_ranges(self, batch: Range, side: Range) -> dict[str, Range]:
        return {"batch": batch, "sequence": (TEXT_TOKENS,) * 3}


class VAEDecoderIO(ComponentIO):
    """``latent_sample`` -> ``sample`` (the image); :attr:`scaling_factor` divides latents before decoding."""

    name = "vae_decoder"

    def __init__(self, config):
        self.config = config_dict(config)
        self.scale_factor = vae_scale_factor(self.config)
        self.scaling_factor = float(self.config["scaling_factor"])

    def inputs(self) -> tuple[TensorSpec, ...]:
        return (TensorSpec("latent_sample", ("batch", self.config["latent_channels"], "latent_height", "latent_width"),
                           "latent"),)

    def outputs(self) -> tuple[TensorSpec, ...]:
        return (TensorSpec("sample", ("batch", self.config["out_channels"], "height", "width"), "image"),)

    def axis_ranges(self, batch: Range, side: Range) -> dict[str, Range]:
        lo, opt, hi = batch
        images = (1, max(1, opt // 2), max(1, hi // 2))  # one image per guidance pair of UNet rows
        return {"batch": images, "latent_height": side, "latent_width": side,
                "height": tuple(s * self.scale_factor for s in side), "width": tuple(s * self.scale_factor for s in side)}


class VAEEncoderIO(VAEDecoderIO):
    """``sample`` (the image) -> ``latent_parameters`` (mean and log-variance, as optimum's ORTVaeEncoder reads them)."""

    name = "vae_encoder"

    def inputs(self) -> tuple[TensorSpec, ...]:
        return (TensorSpec("sample", ("batch", self.config["in_channels"], "height", "width"), "image"),)

    def outputs(self) -> tuple[TensorSpec, ...]:
        return (TensorSpec("latent_parameters", ("batch", 2 * self.config["latent_channels"], "latent_height",
                                                 "latent_width"), "latent_parameters"),)


def pipeline_component_io(name: str, config, sdxl: bool) -> ComponentIO:
    """A Stable Diffusion pipeline's component ``name`` (optimum's folder name) from its config: SD 1.x / 2.x
    and SDXL's first text encoder are CLIPTextModel, SDXL's second CLIPTextModelWithProjection; SDXL's
    pipeline reads every hidden state. The UNet has optimum's scalar timestep."""
    if name in ("text_encoder", "text_encoder_2"):
        return CLIPTextIO(config, name, with_projection=name == "text_encoder_2", hidden_states=sdxl)
    if name == "unet":
        return unet_io(config, scalar_timestep=True)
    if name == "vae_decoder":
        return VAEDecoderIO(config)
    if name == "vae_encoder":
        return VAEEncoderIO(config)
    raise ValueError(f"no component {name!r} in a Stable Diffusion pipeline")
