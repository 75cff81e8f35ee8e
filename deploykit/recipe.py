"""Recipes: what to build, validated on load.

A recipe names a teacher, a target and an ordered list of stages. Every stage's settings are typed
and bounded here; an unknown key, a wrong type or a value out of range is reported with the key's
path and the file, before anything is written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from deploykit.errors import InputError
from deploykit.prune.core import DEFAULT_IGNORED

Backend = Literal["torch-cpu", "onnxruntime-cpu", "torch-cuda", "onnxruntime-cuda"]
Target = Literal["cpu", "cuda"]
Topology = Literal["sd15", "sdxl", "tiny-sd", "tiny-sdxl"]
# Channel counts the target's kernels like: AVX-512 / oneDNN blocks of 8 floats on CPU; on GPUs, fp16
# tensor-core tiles want multiples of 64 for the widths to map onto whole tiles.
ROUND_TO_BY_TARGET = {"cpu": 8, "cuda": 64}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PruneStage(_Strict):
    """Structured channel pruning with torch-pruning's DepGraph, to a MACs target found by search."""

    stage: Literal["prune"] = "prune"
    criterion: Literal["magnitude", "random", "taylor", "diff-pruning", "nici", "cap"] = Field(
        "magnitude", description="importance criterion (deploykit.prune.importance)")
    macs_target: float = Field(0.5, gt=0.05, le=1.0, description="student MACs / teacher MACs, at most")
    round_to: int | None = Field(None, ge=1, le=256,
                                 description="keep channel counts multiples of this (default: by target, cpu 8, cuda 64)")
    ignored: list[str] | None = Field(
        None, description="fnmatch patterns of layers whose output channels stay dense (default: "
                          f"{', '.join(DEFAULT_IGNORED)}; SD UNets also conv_in and add_embedding.*)")
    max_layer_ratio: float = Field(0.9, gt=0, lt=1)
    gradient_batches: int = Field(4, ge=1, le=1000, description="batches for the taylor and cap criteria")
    batch_size: int = Field(64, ge=1, le=4096)


class DistillStage(_Strict):
    """Recovery fine-tuning: denoising loss plus output KD against the dense teacher."""

    stage: Literal["distill"] = "distill"
    steps: int = Field(300, ge=1, le=10_000_000)
    batch_size: int = Field(64, ge=1, le=4096)
    lr: float = Field(5e-4, gt=0, lt=1)
    warmup_steps: int = Field(20, ge=0)
    denoise_weight: float = Field(1.0, ge=0)
    output_kd_weight: float = Field(1.0, ge=0)
    checkpoint_every: int = Field(50, ge=1)

    @model_validator(mode="after")
    def _some_loss(self):
        if self.denoise_weight == 0 and self.output_kd_weight == 0:
            raise ValueError("denoise_weight and output_kd_weight are both 0: nothing to train on")
        return self


class ExportStage(_Strict):
    """ONNX export of teacher and student (whole SD pipelines in optimum's layout), checked with polygraphy."""

    stage: Literal["export"] = "export"
    opset: int = Field(17, ge=13, le=23)
    fp16: bool = Field(False, description="fp16 graphs (for GPUs; the fp32 graph is what CPU backends run)")
    atol: float = Field(1e-4, gt=0)
    rtol: float = Field(1e-3, gt=0)
    check_batch: int = Field(4, ge=1, le=256)


class EngineStage(_Strict):
    """TensorRT engines of the teacher's and the student's UNet from the export stage's ONNX (needs TensorRT and a GPU).

    Profiles default to the build's shapes: batch 1..B with B optimal (bench's batch, else 2 for SD and
    32 otherwise) and the recipe's resolution fixed. ``int8`` needs an INT8 QDQ graph from a quantize
    stage (role ``onnx_int8``); ``best`` uses it where present, fp16 otherwise.
    """

    stage: Literal["engine"] = "engine"
    precision: Literal["fp16", "int8", "best"] = "fp16"
    sparse_weights: Literal["auto", "on", "off"] = Field(
        "auto", description="BuilderFlag.SPARSE_WEIGHTS: auto turns it on when the student carries 2:4 masks")
    workspace_gb: float = Field(4.0, gt=0, le=1024)
    batch: tuple[int, int, int] | None = Field(None, description="min, opt, max batch of the optimization profile")
    resolution: tuple[int, int, int] | None = Field(
        None, description="min, opt, max image side in pixels (default: the recipe's resolution, fixed)")
    timing_cache: bool = Field(True, description="reuse tactic timings across builds (engines/timing.cache)")
    optimization_level: int = Field(3, ge=0, le=5)

    @field_validator("batch", "resolution")
    @classmethod
    def _ordered(cls, v):
        if v is not None and not (1 <= v[0] <= v[1] <= v[2]):
            raise ValueError(f"needs 1 <= min <= opt <= max, got {list(v)}")
        return v


class VerifyStage(_Strict):
    """torch vs ONNX Runtime (fp32, and the fp16 graph where exported) vs TensorRT engines, with polygraphy."""

    stage: Literal["verify"] = "verify"
    batches: int = Field(2, ge=1, le=100, description="input batches compared")
    batch_size: int = Field(2, ge=1, le=256)
    fp32_atol: float = Field(1e-4, gt=0)
    fp32_rtol: float = Field(1e-3, gt=0)
    fp16_atol: float = Field(5e-2, gt=0)
    fp16_rtol: float = Field(5e-2, gt=0)
    int8_atol: float = Field(2e-1, gt=0)
    int8_rtol: float = Field(2e-1, gt=0)
    check_sparsity: bool = Field(True, description="check that a masked student's weights are still 2:4")


class EndToEnd(_Strict):
    """A whole generation: text encoding, ``steps`` UNet steps with classifier-free guidance, VAE decode."""

    steps: int = Field(10, ge=1, le=1000)
    runs: int = Field(3, ge=1, le=1000)
    warmup: int = Field(1, ge=0, le=100)
    prompt: str = Field("a photograph of an astronaut riding a horse", max_length=1000)
    guidance_scale: float = Field(7.5, ge=1.0, le=50.0)


class BenchStage(_Strict):
    """Latency of teacher and student per backend, interleaved in one run."""

    stage: Literal["bench"] = "bench"
    backends: list[Backend] = Field(default_factory=lambda: ["torch-cpu", "onnxruntime-cpu"], min_length=1)
    batch_size: int | None = Field(None, ge=1, le=4096,
                                   description="samples per UNet call (default: 2 for SD, classifier-free guidance; 32 otherwise)")
    precision: Literal["fp32", "fp16"] = Field("fp32", description="fp16 needs a CUDA backend")
    compile: bool = Field(False, description="torch backends: time torch.compile'd models (CUDA)")
    warmup: int = Field(10, ge=0)
    runs: int = Field(50, ge=3, le=100_000)
    end_to_end: EndToEnd | None = Field(None, description="also time whole generations (SD pipelines)")
    estimate: bool = Field(False, description="put a roofline estimate beside each measurement (deploykit.bench.roofline; "
                                              "CPU peaks measured on the spot, GPU peaks from the data sheet)")

    @field_validator("backends")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError("a backend is listed twice")
        return v


class EvalStage(_Strict):
    """Quality: FID on the zoo's features, PSNR / SSIM against the teacher, a sample grid.

    SD teachers: PSNR / SSIM of the student's images against the teacher's, from the same prompts and seeds.
    """

    stage: Literal["eval"] = "eval"
    num_samples: int = Field(512, ge=1, le=1_000_000)
    steps: int = Field(25, ge=1, le=1000, description="sampling steps per image")
    scheduler: Literal["ddim", "dpm-solver++", "euler"] = "ddim"
    prompts: list[str] = Field(default_factory=lambda: list(DEFAULT_PROMPTS), min_length=1,
                               description="SD teachers: prompts, cycled over num_samples")
    guidance_scale: float = Field(7.5, ge=1.0, le=50.0)
    batch_size: int = Field(128, ge=1, le=4096)
    grid_samples: int = Field(32, ge=1, le=256)


Stage = Annotated[Union[PruneStage, DistillStage, ExportStage, EngineStage, VerifyStage, BenchStage, EvalStage],
                  Field(discriminator="stage")]

DEFAULT_PROMPTS = ("a photograph of an astronaut riding a horse", "a red bicycle leaning on a brick wall",
                   "a bowl of ramen, studio lighting", "a lighthouse on a cliff at sunset")

# A stage may only come after the stages it reads from.
_ORDER = ["prune", "distill", "export", "engine", "verify", "bench", "eval"]


class Recipe(_Strict):
    """A deploykit build: ``deploykit build RECIPE``."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    teacher: str = Field(description="zoo:NAME, hf:ORG/NAME[@REVISION], random:TOPOLOGY, or a local diffusers "
                                     "folder (relative to the recipe file)")
    topology: Topology | None = Field(None, description="the teacher's architecture, for --random-weights")
    resolution: int | None = Field(None, ge=8, le=4096, description="SD: image side in pixels (default: the model's)")
    target: Target = "cpu"
    seed: int = Field(0, ge=0)
    stages: list[Stage] = Field(min_length=1)

    @field_validator("stages")
    @classmethod
    def _order(cls, stages: list) -> list:
        names = [s.stage for s in stages]
        if len(set(names)) != len(names):
            raise ValueError(f"a stage appears twice: {names}")
        if names != sorted(names, key=_ORDER.index):
            raise ValueError(f"stages must run in the order {' -> '.join(n for n in _ORDER if n in names)}")
        needs_student = [n for n in names if n in ("distill", "export", "engine", "verify", "bench", "eval")]
        if needs_student and "prune" not in names:
            raise ValueError(f"{needs_student[0]} works on a student: add a prune stage before it")
        needs_onnx = [n for n in names if n in ("engine", "verify")]
        if needs_onnx and "export" not in names:
            raise ValueError(f"{needs_onnx[0]} works on the exported ONNX: add an export stage before it")
        return stages

    @model_validator(mode="after")
    def _target_backends(self):
        bench = self.stage("bench")
        if bench is not None:
            wrong = [b for b in bench.backends if not b.endswith(self.target)]
            if wrong:
                raise ValueError(f"stages: bench backend {wrong[0]} does not run on target {self.target}")
            if bench.precision == "fp16" and self.target == "cpu":
                raise ValueError("stages: bench precision fp16 needs target cuda")
        if self.stage("engine") is not None and self.target == "cpu":
            raise ValueError("stages: engine builds TensorRT engines, which run on target cuda, not cpu")
        return self

    def stage(self, name: str):
        return next((s for s in self.stages if s.stage == name), None)

    def round_to(self) -> int | None:
        prune = self.stage("prune")
        return None if prune is None else (prune.round_to or ROUND_TO_BY_TARGET[self.target])


def _format_errors(err: ValidationError, path: Path) -> str:
    lines = []
    for e in err.errors():
        loc = list(e["loc"])
        # "stages.0.prune.criterion" reads better as "stages[0] (prune).criterion"
        parts: list[str] = []
        i = 0
        while i < len(loc):
            item = loc[i]
            if isinstance(item, int):
                parts[-1] = f"{parts[-1]}[{item}]"
                if i + 1 < len(loc) and loc[i + 1] in _ORDER:
                    i += 1
            else:
                parts.append(str(item))
            i += 1
        key = ".".join(parts) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        lines.append(f"{path}: {key}: {msg}")
    return "\n".join(lines)


def load_recipe(path: str | Path) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"recipe not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise InputError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: a recipe is a mapping of keys (name, teacher, stages, ...)")
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        raise InputError(_format_errors(e, path)) from None


def json_schema() -> dict:
    return Recipe.model_json_schema()
