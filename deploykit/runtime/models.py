"""The two kinds of model an artifact holds, loaded for one backend, each with one batched sampling call.

``PixelModel``: an unconditional pixel-space UNet (the zoo teachers). ``SDModel``: a Stable Diffusion
pipeline run component by component (tokenizer, text encoder, UNet with classifier-free guidance, VAE
decoder), so that requests with different prompts and seeds share one UNet call per step.
Both take the starting noise from the caller: each request draws its own from its own seed, which is
what makes a batched request give the image it gives alone.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from deploykit.errors import InputError
from deploykit.models.io_spec import VAEDecoderIO
from deploykit.runtime.backends import OnnxRuntimeBackend, TorchBackend
from deploykit.runtime.files import VerifiedArtifact
from deploykit.runtime.sampling import make_pipeline_scheduler, make_scheduler, sample

ONNX_UNET = "model.onnx"
STUDENT_DECODER = "model/vae_decoder"


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: not readable JSON ({e})") from None


def _device(backend: str) -> str:
    return "cuda" if backend.endswith("cuda") else "cpu"


def _providers(backend: str) -> list[str]:
    return ["CUDAExecutionProvider", "CPUExecutionProvider"] if backend == "onnxruntime-cuda" else ["CPUExecutionProvider"]


def _torch_unet(files: VerifiedArtifact, backend: str):
    from deploykit.models.architecture import load_model

    unet = TorchBackend(load_model(files.folder("model")), _device(backend))

    def call(*inputs: torch.Tensor) -> torch.Tensor:
        return unet(*inputs).float().cpu()  # the schedulers step on the CPU, in fp32
    return call


class PixelModel:
    kind = "pixel"

    def __init__(self, files: VerifiedArtifact, arch: dict, backend: str):
        config = arch["config"]
        size = config["sample_size"]
        self.channels = config["in_channels"]
        self.size = size if isinstance(size, int) else size[0]
        self.scheduler_config = _read_json(files.file("model/scheduler_config.json"))
        if backend.startswith("onnxruntime-"):
            self.unet = OnnxRuntimeBackend(files.folder("onnx") / "unet" / ONNX_UNET, _providers(backend))
        else:
            self.unet = _torch_unet(files, backend)

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        return (self.channels, height, width)

    def generate(self, noise: torch.Tensor, scheduler: str, steps: int, **_) -> torch.Tensor:
        """Images in [-1, 1], one per noise sample."""
        return sample(self.unet, make_scheduler(scheduler, self.scheduler_config), noise, steps)


class SDModel:
    kind = "sd"

    def __init__(self, files: VerifiedArtifact, arch: dict, backend: str):
        from transformers import CLIPTokenizer

        unet_config = arch["config"]
        if backend.startswith("onnxruntime-"):
            folder = files.folder("onnx")
            providers = _providers(backend)
            self.text_encoder = OnnxRuntimeBackend(folder / "text_encoder" / ONNX_UNET, providers)
            self.unet = OnnxRuntimeBackend(folder / "unet" / ONNX_UNET, providers)
            self.vae_decoder = OnnxRuntimeBackend(folder / "vae_decoder" / ONNX_UNET, providers)
            vae_config = _read_json(folder / "vae_decoder" / "config.json")
            tokenizer_dir = folder / "tokenizer"
        else:
            # torch runs the student UNet from model/ inside the teacher's other components (stage cache)
            teacher = files.stage("teacher")
            if teacher is None or not (teacher / "pipeline").is_dir():
                raise InputError(f"{files.root}: backend {backend} needs the teacher's pipeline components in the stage "
                                 "cache (stages/*-teacher-*/pipeline); use an onnxruntime backend with onnx/")
            self.unet = _torch_unet(files, backend)
            self._torch_components(teacher / "pipeline", _device(backend))
            if files.has(STUDENT_DECODER):  # a decoder stage's smaller VAE decoder (the ONNX pipeline has it too)
                from deploykit.models.vae_decoder import use_decoder

                use_decoder(self._vae, files.folder(STUDENT_DECODER))
            vae_config = dict(self._vae.config)
            tokenizer_dir = teacher / "pipeline" / "tokenizer"
        self.tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
        self.scheduler_config = _read_json(files.file("model/scheduler_config.json"))
        vae = VAEDecoderIO(vae_config)
        self.scaling_factor, self.vae_scale = vae.scaling_factor, vae.scale_factor
        self.channels = unet_config["in_channels"]
        sample_size = unet_config["sample_size"]
        sample_size = sample_size if isinstance(sample_size, int) else sample_size[0]
        # the UNet halves the latent once per down block but the last: sides that divide evenly keep
        # every skip connection the same shape (the exported graphs assume it)
        self.size_multiple = max(8, self.vae_scale * 2 ** (len(unet_config["block_out_channels"]) - 1))
        resolution = _read_json(files.file("report.json")).get("resolution") if files.has("report.json") else None
        self.size = resolution or sample_size * self.vae_scale

    def _torch_components(self, folder: Path, device: str) -> None:
        from diffusers import AutoencoderKL
        from transformers import CLIPTextModel

        text = CLIPTextModel.from_pretrained(folder / "text_encoder", use_safetensors=True).to(device).eval()
        self._vae = AutoencoderKL.from_pretrained(folder / "vae", use_safetensors=True).to(device).eval()

        @torch.no_grad()
        def encode(ids: torch.Tensor) -> torch.Tensor:
            return text(input_ids=ids.to(device)).last_hidden_state.float().cpu()

        @torch.no_grad()
        def decode(latents: torch.Tensor) -> torch.Tensor:
            return self._vae.decode(latents.to(device)).sample.float().cpu()

        self.text_encoder, self.vae_decoder = encode, decode

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
        return SDModel(files, arch, backend)
    raise InputError(f"{files.root}: model/architecture.json names {cls!r}, which the runtime does not run")
