"""One Python call from an artifact to images: ``Pipeline.from_artifact(path)(prompt, steps=20)``.

The pipeline checks every file it loads against the artifact's manifest, runs on the best backend
this machine has (see :mod:`deploykit.runtime.choose`), and samples with a diffusers scheduler
(``ddim``, ``dpm-solver++``, ``euler``) configured from the artifact's own scheduler config.

Unconditional pixel models (the zoo teachers) take no prompt: a prompt sent to one is refused rather
than ignored, so that a client never believes it conditioned an image it did not. Their
``guidance_scale`` has no meaning and is ignored.

:meth:`Pipeline.run_batch` runs several requests in one sampling loop when they agree on
:meth:`Request.batch_key`; each request draws its starting noise from its own seed, so it gets the
same image batched as alone (up to floating-point reordering in the backend's kernels).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from PIL import Image

from deploykit.runtime.choose import PREFERENCE, ArtifactParts, choose_backend
from deploykit.runtime.files import VerifiedArtifact
from deploykit.runtime.models import PixelModel, SDModel, load_model_for

SCHEDULERS = ("ddim", "dpm-solver++", "euler")
MAX_SEED = 2**32 - 1


class RequestError(ValueError):
    """A request this artifact cannot serve; ``field`` names the offending field."""

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(f"{field}: {message}")


@dataclass(frozen=True)
class Request:
    prompt: str | None = None
    negative_prompt: str | None = None
    steps: int = 20
    guidance_scale: float = 7.5
    seed: int | None = None
    scheduler: str = "ddim"
    height: int | None = None
    width: int | None = None
    num_images: int = 1

    def batch_key(self) -> tuple:
        """Requests with equal keys can share one sampling loop."""
        return (self.steps, self.scheduler, float(self.guidance_scale), self.height, self.width)


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """[-1, 1] tensors (N, C, H, W) -> 8-bit images: grey for one channel, RGB for three."""
    pixels = ((images.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).cpu()
    if pixels.shape[1] == 1:
        return [Image.fromarray(p[0].numpy(), mode="L") for p in pixels]
    return [Image.fromarray(p.permute(1, 2, 0).numpy(), mode="RGB") for p in pixels]


class Pipeline:
    def __init__(self, model: PixelModel | SDModel, backend: str, root: Path, recipe: str | None = None):
        self.model, self.backend, self.root, self.recipe = model, backend, root, recipe

    @classmethod
    def from_artifact(cls, path: str | Path, backend: str | None = None, verify: bool = True) -> Pipeline:
        """Load the artifact at ``path`` on ``backend`` (one of :data:`PREFERENCE`; default: the best present).

        ``verify=False`` skips hashing (faster start for multi-GB artifacts already checked with
        ``deploykit inspect``); a file missing from the manifest is refused either way.
        """
        files = VerifiedArtifact(path, verify=verify)
        parts = ArtifactParts(onnx=files.has("onnx/unet/model.onnx"), engines=(files.root / "engines").is_dir())
        chosen = choose_backend(parts, backend)
        return cls(load_model_for(files, chosen), chosen, files.root, files.manifest.get("recipe", {}).get("name"))

    @property
    def kind(self) -> str:
        return self.model.kind

    def info(self) -> dict:
        info = {"artifact": str(self.root), "recipe": self.recipe, "kind": self.kind, "backend": self.backend,
                "height": self.model.size, "width": self.model.size, "channels": self.model.channels,
                "schedulers": list(SCHEDULERS)}
        if isinstance(self.model, SDModel):
            info["size_multiple"] = self.model.size_multiple
        return info

    def prepare(self, request: Request) -> Request:
        """``request`` with its defaults resolved and a seed drawn; raises RequestError where it cannot run."""
        if request.steps < 1:
            raise RequestError("steps", "must be at least 1")
        if request.num_images < 1:
            raise RequestError("num_images", "must be at least 1")
        if request.scheduler not in SCHEDULERS:
            raise RequestError("scheduler", f"unknown scheduler {request.scheduler!r} (known: {', '.join(SCHEDULERS)})")
        if request.seed is not None and not 0 <= request.seed <= MAX_SEED:
            raise RequestError("seed", f"must be between 0 and {MAX_SEED}")
        seed = request.seed if request.seed is not None else secrets.randbelow(MAX_SEED + 1)
        size = self.model.size
        if isinstance(self.model, PixelModel):
            for name in ("prompt", "negative_prompt"):
                if getattr(request, name) is not None:
                    raise RequestError(name, "this artifact is an unconditional pixel-space model; it takes no prompt")
            for name in ("height", "width"):
                value = getattr(request, name)
                if value is not None and value != size:
                    raise RequestError(name, f"this model generates {size}x{size} images only")
            return replace(request, seed=seed, height=size, width=size, guidance_scale=1.0)
        if request.prompt is None:
            raise RequestError("prompt", "required: this artifact is a text-to-image model")
        m = self.model.size_multiple
        for name in ("height", "width"):
            value = getattr(request, name)
            if value is not None and (value < m or value % m):
                raise RequestError(name, f"must be a positive multiple of {m} for this model")
        return replace(request, seed=seed, height=request.height or size, width=request.width or size,
                       negative_prompt=request.negative_prompt or "")

    def run_batch(self, requests: list[Request]) -> list[list[Image.Image]]:
        """Images per request, from one sampling loop; the requests are prepared and share one batch key."""
        first = requests[0]
        if any(r.batch_key() != first.batch_key() for r in requests):
            raise ValueError("run_batch: requests differ in steps, scheduler, guidance or size")
        shape = self.model.latent_shape(first.height, first.width)
        noise = torch.cat([torch.randn(r.num_images, *shape, generator=torch.Generator().manual_seed(r.seed))
                           for r in requests])
        per_image = [r for r in requests for _ in range(r.num_images)]
        images = self.model.generate(noise, first.scheduler, first.steps, prompts=[r.prompt for r in per_image],
                                     negative_prompts=[r.negative_prompt for r in per_image],
                                     guidance_scale=first.guidance_scale)
        out, i = [], 0
        for r in requests:
            out.append(to_pil(images[i:i + r.num_images]))
            i += r.num_images
        return out

    def __call__(self, prompt: str | None = None, *, negative_prompt: str | None = None, steps: int = 20,
                 guidance_scale: float = 7.5, seed: int | None = None, scheduler: str = "ddim", height: int | None = None,
                 width: int | None = None, num_images: int = 1) -> list[Image.Image]:
        request = self.prepare(Request(prompt, negative_prompt, steps, guidance_scale, seed, scheduler, height, width,
                                       num_images))
        return self.run_batch([request])[0]


__all__ = ["PREFERENCE", "Pipeline", "Request", "RequestError", "SCHEDULERS", "to_pil"]
