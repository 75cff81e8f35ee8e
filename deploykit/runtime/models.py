"""The two kinds of model an artifact holds, loaded for one backend, each with one batched sampling call.

``PixelModel``: an unconditional pixel-space UNet (the zoo teachers). ``SDModel``: a Stable Diffusion
pipeline run component by component (tokenizer, text encoder, UNet with classifier-free guidance, VAE
decoder), so that requests with different prompts and seeds share one UNet call per step.
Both take the starting noise from the caller: each request draws its own from its own seed, which is
what makes a batched request give the image it gives alone.

An SD model is built from :class:`SDComponents`: from an ONNX pipeline folder in optimum's layout
(:func:`onnx_sd_components`, any ONNX backend) or from torch modules (:func:`torch_sd_components`).
The bench times the same components, one by one, for teacher and student.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from deploykit.errors import InputError
from deploykit.models.io_spec import VAEDecoderIO
from deploykit.runtime.backends import GraphBackend, TorchBackend, onnx_backend
from deploykit.runtime.files import VerifiedArtifact
from deploykit.runtime.sampling import make_pipeline_scheduler, make_scheduler, sample

ONNX_FILE = "model.onnx"
STUDENT_DECODER = "model/vae_decoder"


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: not readable JSON ({e})") from None


def _device(backend: str) -> str:
    return "cuda" if backend.endswith("cuda") else "cpu"


def _torch_unet(files: VerifiedArtifact, backend: str):
    from deploykit.models.architecture import load_model

    return torch_call(load_model(files.folder("model")), _device(backend))


def torch_call(model: torch.nn.Module, device: str = "cpu", dtype: torch.dtype = torch.float32) -> Callable[..., torch.Tensor]:
    """A torch UNet as the samplers call it: fp32 CPU tensors out, whatever device and dtype it runs in."""
    unet = TorchBackend(model, device, dtype)

    def call(*inputs: torch.Tensor) -> torch.Tensor:
        return unet(*inputs).float().cpu()  # the schedulers step on the CPU, in fp32
    return call


def artifact_graphs(files: VerifiedArtifact, backend: str) -> tuple[Path, Callable[[str], GraphBackend]]:
    """The artifact's verified ``onnx/`` folder, and a loader of one of its components on ``backend``.

    OpenVINO keeps each component's compiled model in a cache folder named after the component's
    files as the manifest lists them (:func:`deploykit.runtime.openvino.cache_folder`)."""
    folder = files.folder("onnx")

    def load(component: str) -> GraphBackend:
        cache = None
        if backend == "openvino-cpu":
            from deploykit.runtime.openvino import cache_folder

            prefix = f"onnx/{component}/"
            cache = cache_folder([sha for f, sha in files.files.items() if f.startswith(prefix)])
        return onnx_backend(backend, folder / component / ONNX_FILE, cache)
    return folder, load


class PixelModel:
    kind = "pixel"

    def __init__(self, files: VerifiedArtifact, arch: dict, backend: str):
        config = arch["config"]
        size = config["sample_size"]
        self.channels = config["in_channels"]
        self.size = size if isinstance(size, int) else size[0]
        self.scheduler_config = _read_json(files.file("model/scheduler_config.json"))
        if backend.startswith("torch-"):
            self.unet = _torch_unet(files, backend)
        else:
            self.unet = artifact_graphs(files, backend)[1]("unet")

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        return (self.channels, height, width)

    def generate(self, noise: torch.Tensor, scheduler: str, steps: int, **_) -> torch.Tensor:
        """Images in [-1, 1], one per noise sample."""
        return sample(self.unet, make_scheduler(scheduler, self.scheduler_config), noise, steps)


@dataclass
class SDComponents:
    """What an SD pipeline runs, each a call on CPU tensors: token ids -> text embeddings, the UNet's
    positional inputs -> noise, scaled latents -> images in [-1, 1]."""

    text_encoder: Callable[[torch.Tensor], torch.Tensor]
    unet: Callable[..., torch.Tensor]
    vae_decoder: Callable[[torch.Tensor], torch.Tensor]
    tokenizer_dir: Path
    vae_config: dict


def onnx_sd_components(folder: Path, load: Callable[[str], GraphBackend]) -> SDComponents:
    """An SD pipeline folder in optimum's layout (``text_encoder/``, ``unet/``, ``vae_decoder/``, ``tokenizer/``),
    each graph loaded by ``load(component)``: the student's own text encoder and VAE decoder, whatever they are."""
    return SDComponents(text_encoder=load("text_encoder"), unet=load("unet"), vae_decoder=load("vae_decoder"),
                        tokenizer_dir=folder / "tokenizer", vae_config=_read_json(folder / "vae_decoder" / "config.json"))


def torch_sd_components(pipeline_dir: Path, unet: Callable[..., torch.Tensor], device: str = "cpu",
                        vae: torch.nn.Module | None = None, text_encoder: torch.nn.Module | None = None) -> SDComponents:
    """A diffusers SD pipeline folder's text encoder and VAE around ``unet``.

    ``vae``: a decoder in place of the folder's (anything with ``decode(latents).sample``: an
    ``AutoencoderKL`` with a smaller decoder, an ``AutoencoderTiny``), for a student whose decoder
    was shrunk too; the latents' scaling stays the folder's VAE's. ``text_encoder``, ``vae``: modules
    already loaded, to share them between teacher and student."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel

    text = text_encoder or CLIPTextModel.from_pretrained(pipeline_dir / "text_encoder", use_safetensors=True)
    text = text.to(device).eval()
    config = _read_json(pipeline_dir / "vae" / "config.json")
    vae = (vae or AutoencoderKL.from_pretrained(pipeline_dir / "vae", use_safetensors=True)).to(device).eval()

    @torch.no_grad()
    def encode(ids: torch.Tensor) -> torch.Tensor:
        return text(input_ids=ids.to(device)).last_hidden_state.float().cpu()

    @torch.no_grad()
    def decode(latents: torch.Tensor) -> torch.Tensor:
        out = vae.decode(latents.to(device)).sample.float().cpu()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return out

    return SDComponents(text_encoder=encode, unet=unet, vae_decoder=decode, tokenizer_dir=pipeline_dir / "tokenizer",
                        vae_config=config)


class SDModel:
    kind = "sd"

    def __init__(self, components: SDComponents, unet_config: dict, scheduler_config: dict, size: int | None = None):
        from transformers import CLIPTokenizer

        self.text_encoder, self.unet, self.vae_decoder = components.text_encoder, components.unet, components.vae_decoder
        self.tokenizer = CLIPTokenizer.from_pretrained(components.tokenizer_dir)
        self.scheduler_config = scheduler_config
        vae = VAEDecoderIO(components.vae_config)
        self.scaling_factor, self.vae_scale = vae.scaling_factor, vae.scale_factor
        self.channels = unet_config["in_channels"]
        sample_size = unet_config["sample_size"]
        sample_size = sample_size if isinstance(sample_size, int) else sample_size[0]
        # the UNet halves the latent once per down block but the last: sides that divide evenly keep
        # every skip connection the same shape (the exported graphs assume it)
        self.size_multiple = max(8, self.vae_scale * 2 ** (len(unet_config["block_out_channels"]) - 1))
        self.size = size or sample_size * self.vae_scale

    @classmethod
    def from_artifact(cls, files: VerifiedArtifact, arch: dict, backend: str) -> SDModel:
        if backend.startswith("torch-"):
            # torch runs the student UNet from model/ inside the teacher's other components (stage cache)
            teacher = files.stage("teacher")
            if teacher is None or not (teacher / "pipeline").is_dir():
                raise InputError(f"{files.root}: backend {backend} needs the teacher's pipeline components in the stage "
                                 "cache (stages/*-teacher-*/pipeline); use an ONNX backend with onnx/")
            vae = None
            if files.has(STUDENT_DECODER):  # a decoder stage's smaller VAE decoder (the ONNX pipeline has it too)
                from diffusers import AutoencoderKL

                from deploykit.models.vae_decoder import use_decoder

                vae = AutoencoderKL.from_pretrained(teacher / "pipeline" / "vae", use_safetensors=True)
                use_decoder(vae, files.folder(STUDENT_DECODER))
            components = torch_sd_components(teacher / "pipeline", _torch_unet(files, backend), _device(backend), vae=vae)
        else:
            components = onnx_sd_components(*artifact_graphs(files, backend))
        resolution = _read_json(files.file("report.json")).get("resolution") if files.has("report.json") else None
        return cls(components, arch["config"], _read_json(files.file("model/scheduler_config.json")), resolution)

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        return (self.channels, height // self.vae_scale, width // self.vae_scale)

    def encode(self, prompts: list[str]) -> torch.Tensor:
        ids = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length, truncation=True,
                             return_tensors="pt").input_ids
        return self.text_encoder(ids)

    @torch.no_grad()
    def generate(self, noise: torch.Tensor, scheduler: str, steps: int, prompts: list[str], negative_prompts: list[str],
                 guidance_scale: float) -> torch.Tensor:
        """Images in [-1, 1]: ``noise``, ``prompts`` and ``negative_prompts`` have one entry per image."""
        sched = make_pipeline_scheduler(scheduler, self.scheduler_config)
        sched.set_timesteps(steps)
        guided = guidance_scale > 1.0
        # the unconditional half first, as diffusers orders it
        hidden = self.encode((negative_prompts + prompts) if guided else prompts)
        x = noise * sched.init_noise_sigma
        for t in sched.timesteps:
            x_in = sched.scale_model_input(torch.cat([x, x]) if guided else x, t)
            eps = self.unet(x_in, t.expand(x_in.shape[0]), hidden)
            if guided:
                uncond, cond = eps.chunk(2)
                eps = uncond + guidance_scale * (cond - uncond)
            x = sched.step(eps, t, x).prev_sample
        return self.vae_decoder(x / self.scaling_factor).clamp(-1, 1)


def load_model_for(files: VerifiedArtifact, backend: str) -> PixelModel | SDModel:
    from deploykit.models.architecture import read_architecture

    arch = read_architecture(files.file("model/architecture.json"))
    cls, config = arch.get("class"), arch.get("config", {})
    if cls == "UNet2DModel":
        return PixelModel(files, arch, backend)
    if cls == "UNet2DConditionModel":
        if config.get("addition_embed_type") == "text_time":
            raise InputError(f"{files.root}: SDXL artifacts are not served by deploykit.runtime yet (SD 1.x / 2.x are)")
        return SDModel.from_artifact(files, arch, backend)
    raise InputError(f"{files.root}: model/architecture.json names {cls!r}, which the runtime does not run")
