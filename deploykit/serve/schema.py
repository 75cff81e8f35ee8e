"""What POST /generate accepts, and the server's limits.

Types are strict (``"20"`` is not a number of steps: a client that sends it has a bug worth hearing
about); unknown fields are refused. Hard bounds are in the field types; the server's configured
limits (``ServeConfig``), usually tighter, are checked against the validation context so that one
message format names the field either way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from deploykit.runtime.pipeline import MAX_SEED, Request


@dataclass(frozen=True)
class ServeConfig:
    max_batch: int = 4           # images per model call; 1 turns batching off
    max_wait_ms: float = 10.0    # how long the oldest waiting request may wait for others to join its batch
    queue_size: int = 16         # requests waiting (beyond the batch being run); more get 503
    timeout_s: float = 60.0      # per request, queueing included; past it, 504
    max_steps: int = 100
    max_side: int = 1024         # pixels, height and width each
    max_prompt_chars: int = 1000  # CLIP reads 77 tokens; this bounds the tokenizer's work, not the model's
    max_images: int = 4          # per request
    max_body_bytes: int = 16 * 1024
    # height x width x steps x images, per request: what one request may cost however its fields combine.
    # None: the largest request at the artifact's own size (see pixel_step_budget)
    max_pixel_steps: int | None = None
    read_timeout_s: float = 10.0  # to send a request's headers, and again its body; past it, dropped / 408
    warmup: bool = True          # one tiny generation before serving: the first call pays the kernels' set-up

    def __post_init__(self):
        for name in ("max_batch", "queue_size", "max_steps", "max_side", "max_prompt_chars", "max_images",
                     "max_body_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.max_pixel_steps is not None and self.max_pixel_steps < 1:
            raise ValueError("max_pixel_steps must be at least 1")
        if self.max_wait_ms < 0 or self.timeout_s <= 0 or self.read_timeout_s <= 0:
            raise ValueError("max_wait_ms must be at least 0, timeout_s and read_timeout_s above 0")

    def pixel_step_budget(self, side: int) -> int:
        """The per-request compute cap for a model whose own images are ``side`` x ``side``."""
        if self.max_pixel_steps is not None:
            return self.max_pixel_steps
        return side * side * self.max_steps * self.max_images


class GenerateBody(BaseModel):
    # validate_default: a default is held to the server's limits too (20 steps on a --max-steps 10 server
    # is refused, naming steps, rather than run)
    model_config = ConfigDict(extra="forbid", strict=True, validate_default=True)

    prompt: str | None = Field(None, max_length=100_000, description="required for text-to-image artifacts; "
                               "refused by unconditional pixel models")
    negative_prompt: str | None = Field(None, max_length=100_000)
    steps: int = Field(20, ge=1, le=10_000)
    guidance_scale: float = Field(7.5, ge=0.0, le=50.0, description="classifier-free guidance; 1 or less turns it off")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="default: drawn at random, returned in the response")
    scheduler: Literal["ddim", "dpm-solver++", "euler"] = "ddim"
    height: int | None = Field(None, ge=8, le=16_384, multiple_of=8, description="default: the model's own")
    width: int | None = Field(None, ge=8, le=16_384, multiple_of=8, description="default: the model's own")
    num_images: int = Field(1, ge=1, le=1024)
    format: Literal["png", "base64"] = Field("png", description="png: one image as image/png; base64: JSON list")

    @field_validator("prompt", "negative_prompt")
    @classmethod
    def _prompt_length(cls, v: str | None, info: ValidationInfo) -> str | None:
        limit = _limits(info).max_prompt_chars
        if v is not None and len(v) > limit:
            raise ValueError(f"at most {limit} characters on this server (got {len(v)})")
        return v

    @field_validator("steps")
    @classmethod
    def _steps(cls, v: int, info: ValidationInfo) -> int:
        if v > _limits(info).max_steps:
            raise ValueError(f"at most {_limits(info).max_steps} on this server")
        return v

    @field_validator("height", "width")
    @classmethod
    def _side(cls, v: int | None, info: ValidationInfo) -> int | None:
        if v is not None and v > _limits(info).max_side:
            raise ValueError(f"at most {_limits(info).max_side} pixels on this server")
        return v

    @field_validator("num_images")
    @classmethod
    def _images(cls, v: int, info: ValidationInfo) -> int:
        if v > _limits(info).max_images:
            raise ValueError(f"at most {_limits(info).max_images} per request on this server")
        return v

    def to_request(self) -> Request:
        return Request(prompt=self.prompt, negative_prompt=self.negative_prompt, steps=self.steps,
                       guidance_scale=self.guidance_scale, seed=self.seed, scheduler=self.scheduler, height=self.height,
                       width=self.width, num_images=self.num_images)


def _limits(info: ValidationInfo) -> ServeConfig:
    return (info.context or {}).get("limits") or ServeConfig()


def error_messages(error: ValidationError) -> dict[str, str]:
    """``{field: message}`` with pydantic's prefixes dropped; ``body`` for the request as a whole."""
    out = {}
    for e in error.errors(include_url=False):
        field = ".".join(str(p) for p in e["loc"]) or "body"
        if e["type"] == "extra_forbidden":
            msg = "unknown field"
        elif e["type"] == "model_type":
            msg = "must be a JSON object"
        else:
            msg = e["msg"].removeprefix("Value error, ")
        out.setdefault(field, msg)
    return out


def pixel_steps(request: Request) -> int:
    """What a prepared request costs: its sampling loop touches height x width pixels, steps times, per image."""
    return request.height * request.width * request.steps * request.num_images


def parse(body: bytes, limits: ServeConfig) -> GenerateBody:
    return GenerateBody.model_validate_json(body, context={"limits": limits})
