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
from deploykit.quantize.exclude import DEFAULT_EXCLUDE as QUANTIZE_EXCLUDE
from deploykit.sparsity.masks import DEFAULT_EXCLUDE, DEFAULT_MIN_FEATURES

Backend = Literal["torch-cpu", "onnxruntime-cpu", "torch-cuda", "onnxruntime-cuda"]
Target = Literal["cpu", "cuda", "jetson-agx-orin", "jetson-orin-nano"]
# Jetson targets: TensorRT on JetPack. Engines must be built on the device itself, so a Jetson recipe
# ends in a bundle stage and is timed on the device with `deploykit bench ARTIFACT --host user@jetson`.
# The names are those of deploykit.bench.roofline's devices (jetson-agx-orin-64gb, jetson-orin-nano-8gb)
# without the memory size.
JETSON_TARGETS = ("jetson-agx-orin", "jetson-orin-nano")
Topology = Literal["sd15", "sdxl", "tiny-sd", "tiny-sdxl"]
# Channel counts the target's kernels like: AVX-512 / oneDNN blocks of 8 floats on CPU; on GPUs, fp16
# tensor-core tiles want multiples of 64 for the widths to map onto whole tiles.
# AGX Orin has the same Ampere tensor cores (SM 8.7) and TensorRT's kernel library as a discrete GPU:
# 64, like cuda. Orin Nano: 32. Its recipes prune deeper (memory: see recipes/sd15_jetson_nano.yaml),
# and at SD1.5's narrowest level (320 channels) steps of 64 are 20% of the layer, too coarse for the MACs
# search to land near its target; 32 still keeps every width a multiple of the 8 that fp16 tensor-core
# MMAs need, and with only 8 SMs the Nano's GEMMs are small enough that TensorRT picks narrow tiles anyway.
# (Not measured on a Nano yet: `deploykit bench --host` on one is what settles it.)
ROUND_TO_BY_TARGET = {"cpu": 8, "cuda": 64, "jetson-agx-orin": 64, "jetson-orin-nano": 32}
# Backends a bench stage may time on the build machine for a Jetson target (the device is timed remotely)
JETSON_LOCAL_BACKENDS = ("torch-cpu", "onnxruntime-cpu")


def _min_opt_max(v):
    """An optimization profile's (min, opt, max), as TensorRT requires them ordered."""
    if v is not None and not (1 <= v[0] <= v[1] <= v[2]):
        raise ValueError(f"needs 1 <= min <= opt <= max, got {list(v)}")
    return v


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PruneStage(_Strict):
    """Structured channel pruning with torch-pruning's DepGraph, to a MACs target found by search."""

    stage: Literal["prune"] = "prune"
    criterion: Literal["magnitude", "random", "taylor", "diff-pruning", "nici", "cap", "block-removal"] = Field(
        "magnitude", description="importance criterion (deploykit.prune.importance)")
    macs_target: float = Field(0.5, gt=0.05, le=1.0, description="student MACs / teacher MACs, at most")
    round_to: int | None = Field(None, ge=1, le=256,
                                 description="keep channel counts multiples of this (default: by target, cpu 8, cuda 64)")
    ignored: list[str] | None = Field(
        None, description="fnmatch patterns of layers whose output channels stay dense (default: "
                          f"{', '.join(DEFAULT_IGNORED)}; SD UNets also conv_in and add_embedding.*)")
    max_layer_ratio: float = Field(0.9, gt=0, lt=1)
    gradient_batches: int = Field(4, ge=1, le=1000, description="batches for the gradient criteria and block-removal's calibration")
    batch_size: int = Field(64, ge=1, le=4096)


class SparsifyStage(_Strict):
    """2:4 semi-structured masks on the student's eligible Linear / Conv2d weights (the teacher's without a prune stage)."""

    stage: Literal["sparsify"] = "sparsify"
    method: Literal["magnitude", "sparsegpt"] = Field("magnitude", description="sparsegpt needs nvidia-modelopt")
    include: list[str] = Field(default_factory=lambda: ["*"], min_length=1, description="fnmatch globs of layer names")
    exclude: list[str] = Field(default_factory=lambda: list(DEFAULT_EXCLUDE),
                               description=f"layers kept dense (default: {', '.join(DEFAULT_EXCLUDE)})")
    min_features: int = Field(DEFAULT_MIN_FEATURES, ge=0, le=1_000_000,
                              description="layers with fewer input or output channels stay dense (2:4 kernels do not win there)")
    calibration_batches: int = Field(4, ge=1, le=1000, description="sparsegpt: batches of calibration inputs")
    calibration_batch_size: int = Field(16, ge=1, le=4096)


class DistillStage(_Strict):
    """Recovery fine-tuning against the dense teacher: DaKD's loss terms, each with a weight (0 turns it off).

    The defaults are denoising + output KD. Runs in one process inside ``deploykit build``, or over
    several processes / GPUs / machines when the build is started with ``accelerate launch`` (DDP).
    """

    stage: Literal["distill"] = "distill"
    steps: int = Field(300, ge=1, le=10_000_000)
    batch_size: int = Field(64, ge=1, le=4096, description="samples per optimizer step, over all processes and "
                                                           "accumulation steps")
    lr: float = Field(5e-4, gt=0, lt=1)
    warmup_steps: int = Field(20, ge=0)
    denoise_weight: float = Field(1.0, ge=0, description="||eps_student - eps||^2 (Diff-Pruning's recovery)")
    output_kd_weight: float = Field(1.0, ge=0, description="||eps_student - eps_teacher||^2")
    feature_kd_weight: float = Field(0.0, ge=0, description="block outputs, ||f_s - f_t||^2 / ||f_t||^2 (LAPTOP-Diff)")
    attention_kd_weight: float = Field(0.0, ge=0, description="attention outputs, normalised like feature KD")
    distribution_kd_weight: float = Field(0.0, ge=0, description="tau^2 KL(softmax(eps_t / tau) || softmax(eps_s / tau)) "
                                                                  "over spatial positions")
    distribution_temperature: float = Field(1.0, gt=0, le=100, description="tau of the distribution term")
    adversarial_weight: float = Field(0.0, ge=0, description="hinge GAN term of a small discriminator on the noise "
                                                             "prediction")
    adversarial_warmup: int = Field(100, ge=0, description="steps before the discriminator and its term start")
    discriminator_lr: float = Field(2e-4, gt=0, lt=1)
    mixed_precision: Literal["no", "fp16", "bf16"] = Field("no", description="autocast on GPUs (needs target cuda)")
    gradient_accumulation: int = Field(1, ge=1, le=1024, description="micro-batches per optimizer step")
    ema_decay: float = Field(0.0, ge=0, lt=1, description="EMA of the student's weights, saved as the result (0 = off)")
    checkpoint_every: int = Field(50, ge=1)
    mask_mode: Literal["fixed", "sr-ste"] = Field(
        "fixed", description="a 2:4 student's masks: fixed (re-applied after every step) or sr-ste (re-chosen every step "
                             "from the dense weights, straight-through gradients, decay on the pruned weights)")
    sr_ste_decay: float = Field(2e-4, ge=0, lt=1, description="sr-ste: lambda of the decay on masked-out weights")
    prompts: str | None = Field(None, min_length=1, description="Stable Diffusion teachers: a text file of prompts, one "
                                                                "per line (relative to the recipe)")
    teacher_samples: int = Field(512, ge=1, le=1_000_000,
                                 description="teachers without a data set (SD, local folders): samples the teacher "
                                             "generates as training data (SD: cycled over the prompts)")
    teacher_sample_steps: int = Field(25, ge=1, le=1000, description="DDIM steps per generated sample")
    guidance_scale: float = Field(7.5, ge=1.0, le=50.0, description="SD: classifier-free guidance of the generated samples")

    @model_validator(mode="after")
    def _consistent(self):
        weights = [self.denoise_weight, self.output_kd_weight, self.feature_kd_weight, self.attention_kd_weight,
                   self.distribution_kd_weight, self.adversarial_weight]
        if not any(weights):
            raise ValueError("every loss weight is 0 (denoise_weight, output_kd_weight, ...): nothing to train on")
        if self.batch_size % self.gradient_accumulation:
            raise ValueError(f"batch_size {self.batch_size} does not split into gradient_accumulation "
                             f"{self.gradient_accumulation} equal micro-batches")
        if self.adversarial_weight > 0 and self.adversarial_warmup >= self.steps:
            raise ValueError(f"adversarial_warmup {self.adversarial_warmup} >= steps {self.steps}: the adversarial term "
                             "would never start")
        return self


class ExportStage(_Strict):
    """ONNX export of teacher and student (whole SD pipelines in optimum's layout), checked with polygraphy."""

    stage: Literal["export"] = "export"
    opset: int = Field(17, ge=13, le=23)
    fp16: bool = Field(False, description="fp16 graphs (for GPUs; the fp32 graph is what CPU backends run)")
    atol: float = Field(1e-4, gt=0)
    rtol: float = Field(1e-3, gt=0)
    check_batch: int = Field(4, ge=1, le=256)


class QualityLoss(_Strict):
    """The largest quality loss INT8 may cost, each metric in its own "worse" direction, measured by the
    eval stage as INT8 student against fp32 student on the same noise / prompts and seeds."""

    fid: float | None = Field(None, ge=0, description="largest FID increase (zoo teachers)")
    psnr_vs_teacher: float | None = Field(None, ge=0, description="largest drop of PSNR against the teacher, in dB")
    ssim_vs_teacher: float | None = Field(None, ge=0, le=2, description="largest drop of SSIM against the teacher")

    @model_validator(mode="after")
    def _some_metric(self):
        if self.fid is None and self.psnr_vs_teacher is None and self.ssim_vs_teacher is None:
            raise ValueError("name at least one of fid, psnr_vs_teacher, ssim_vs_teacher")
        return self

    def limits(self) -> dict[str, float]:
        return {k: v for k, v in self.model_dump().items() if v is not None}


class QuantizeStage(_Strict):
    """INT8 post-training quantization of the exported teacher and student UNets, calibrated on the teacher's
    own sampling trajectories (noise for pixel UNets, prompts for Stable Diffusion).

    ``backend: onnxruntime`` (the CPU path): ONNX Runtime static quantization into a QDQ graph, per-channel
    weights. ``backend: modelopt`` (the TensorRT path): modelopt INT8 SmoothQuant for linear layers and
    percentile calibration for convolutions, exported as a QDQ graph TensorRT builds INT8 engines from
    (needs ``pip install 'deploykit[modelopt]'``). Both write ``<role>/unet/model.onnx``; the bench times
    them on onnxruntime-cpu beside the fp32 graphs.
    """

    stage: Literal["quantize"] = "quantize"
    backend: Literal["onnxruntime", "modelopt"] = "onnxruntime"
    teacher: bool = Field(True, description="also quantize the teacher, so INT8 and fp32 are compared for both")
    calibration_samples: int = Field(64, ge=1, le=100_000,
                                     description="teacher trajectories to record: noise samples (pixel UNets) or "
                                                 "prompts (SD, cycled over calibration_prompts)")
    calibration_steps: int = Field(10, ge=1, le=1000, description="sampling steps per trajectory; every UNet call is "
                                                                  "one calibration batch")
    calibration_prompts: list[str] = Field(default_factory=lambda: list(CALIBRATION_PROMPTS), min_length=1,
                                           description="SD teachers: calibration prompts (kept apart from eval's)")
    scheduler: Literal["ddim", "dpm-solver++", "euler"] = "ddim"
    guidance_scale: float = Field(7.5, ge=1.0, le=50.0)
    exclude: list[str] = Field(default_factory=lambda: list(QUANTIZE_EXCLUDE),
                               description="fnmatch globs of UNet module names that stay float (default: "
                                           f"{', '.join(QUANTIZE_EXCLUDE)}: NVIDIA's diffusers exclusions)")
    per_channel: bool = Field(True, description="one weight scale per output channel")
    calibration_method: Literal["minmax", "percentile", "entropy"] = Field(
        "minmax", description="onnxruntime: activation ranges from the min / max, a percentile, or entropy")
    activations: Literal["uint8", "int8"] = Field("uint8", description="onnxruntime: activation type (uint8: asymmetric)")
    reduce_range: bool = Field(False, description="onnxruntime: 7-bit weights (x86 CPUs without VNNI can saturate)")
    alpha: float = Field(0.8, ge=0, le=1, description="modelopt: SmoothQuant migration strength")
    conv_calibration: Literal["percentile", "max"] = Field("percentile", description="modelopt: convolution input ranges")
    percentile: float = Field(99.99, gt=50, le=100, description="percentile of |x| for percentile calibration")
    max_quality_loss: QualityLoss | None = Field(
        None, description="fail the build (exit code 3) when the INT8 student loses more than this against the fp32 "
                          "student; needs an eval stage")

    @field_validator("exclude")
    @classmethod
    def _patterns(cls, v: list[str]) -> list[str]:
        if any(not p.strip() for p in v):
            raise ValueError("exclude patterns must be non-empty")
        return v


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

    _ordered = field_validator("batch", "resolution")(_min_opt_max)


class BundleStage(_Strict):
    """A self-contained bundle for a Jetson (``bundle/`` in the artifact): the exported ONNX graphs, a script that
    builds TensorRT engines on the device with its own TensorRT, and ``run.py``, which benchmarks teacher against
    student and serves the student with no deploykit installed. ``deploykit bench ARTIFACT --host user@device``
    copies it over SSH, builds, runs and brings the figures back.

    Engine settings mean what they mean in the engine stage; the profiles default to the build's shapes
    (batch 1..B with B optimal, the recipe's resolution fixed).
    """

    stage: Literal["bundle"] = "bundle"
    precision: Literal["fp16", "int8", "best"] = Field(
        "fp16", description="TensorRT precision: int8 needs a quantize stage's INT8 QDQ UNets; best uses them where present")
    sparse_weights: Literal["auto", "on", "off"] = Field(
        "auto", description="BuilderFlag.SPARSE_WEIGHTS (trtexec --sparsity=enable): auto turns it on for a model "
                            "carrying 2:4 masks")
    onnx: Literal["fp32", "fp16"] = Field(
        "fp32", description="graphs shipped: fp32 (TensorRT builds fp16 from it with the FP16 flag; what the "
                            "onnxruntime-cpu stand-in runs) or fp16 (half the bytes to copy and for TensorRT to parse: "
                            "8 GB devices; needs export.fp16)")
    pipeline: bool = Field(True, description="SD: also ship the student's text encoder, VAE decoder, tokenizer and "
                                             "scheduler, so that `run.py serve` makes images (false: UNets only)")
    batch_size: int | None = Field(None, ge=1, le=4096,
                                   description="UNet batch of run.py bench (default: 2 for SD, classifier-free guidance; 32 otherwise)")
    batch: tuple[int, int, int] | None = Field(None, description="min, opt, max batch of the engines' optimization profile")
    resolution: tuple[int, int, int] | None = Field(
        None, description="min, opt, max image side in pixels of the profile (default: the recipe's resolution, fixed)")
    workspace_gb: float = Field(2.0, gt=0, le=1024, description="TensorRT builder workspace on the device")
    optimization_level: int = Field(3, ge=0, le=5)
    timing_cache: bool = Field(True, description="reuse tactic timings across builds on the device (engines/timing.cache)")
    warmup: int = Field(10, ge=0, le=100_000, description="run.py bench: warm-up pairs")
    runs: int = Field(50, ge=3, le=100_000, description="run.py bench: timed teacher / student pairs")

    _ordered = field_validator("batch", "resolution")(_min_opt_max)


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
    semi_structured: bool = Field(True, description="torch-cuda: run a 2:4 student's masked layers on cuSPARSELt "
                                                    "(false: the same zeros through dense kernels)")
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


Stage = Annotated[Union[PruneStage, SparsifyStage, DistillStage, ExportStage, QuantizeStage, BundleStage, EngineStage,
                        VerifyStage, BenchStage, EvalStage],
                  Field(discriminator="stage")]

DEFAULT_PROMPTS = ("a photograph of an astronaut riding a horse", "a red bicycle leaning on a brick wall",
                   "a bowl of ramen, studio lighting", "a lighthouse on a cliff at sunset")
CALIBRATION_PROMPTS = ("a cat sitting on a windowsill, morning light", "a city street at night in the rain",
                       "a watercolor painting of mountains and a lake", "a close-up photo of a sunflower",
                       "an old wooden boat on a beach", "a plate of pancakes with berries")

# A stage may only come after the stages it reads from.
_ORDER = ["prune", "sparsify", "distill", "export", "quantize", "bundle", "engine", "verify", "bench", "eval"]


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
        needs_student = [n for n in names if n in ("distill", "export", "quantize", "bundle", "engine", "verify", "bench",
                                                    "eval")]
        if needs_student and "prune" not in names and "sparsify" not in names:
            raise ValueError(f"{needs_student[0]} works on a student: add a prune or sparsify stage before it")
        needs_onnx = [n for n in names if n in ("quantize", "bundle", "engine", "verify")]
        if needs_onnx and "export" not in names:
            raise ValueError(f"{needs_onnx[0]} works on the exported ONNX graphs: add an export stage before it")
        return stages

    @model_validator(mode="after")
    def _target_backends(self):
        if self.target in JETSON_TARGETS:
            self._check_jetson()
        elif self.stage("bundle") is not None:
            raise ValueError(f"stages: bundle makes an on-device bundle for a Jetson target ({', '.join(JETSON_TARGETS)}); "
                             f"target {self.target} builds and times on this machine (engine / bench stages)")
        bench = self.stage("bench")
        if bench is not None and self.target not in JETSON_TARGETS:
            wrong = [b for b in bench.backends if not b.endswith(self.target)]
            if wrong:
                raise ValueError(f"stages: bench backend {wrong[0]} does not run on target {self.target}")
            if bench.precision == "fp16" and self.target == "cpu":
                raise ValueError("stages: bench precision fp16 needs target cuda")
        quantize = self.stage("quantize")
        if quantize is not None and quantize.max_quality_loss is not None and self.stage("eval") is None:
            raise ValueError("stages: quantize.max_quality_loss is checked on the eval stage's figures: add an eval stage")
        distill = self.stage("distill")
        if distill is not None and distill.mixed_precision != "no" and self.target == "cpu":
            raise ValueError(f"stages: distill.mixed_precision {distill.mixed_precision} needs target cuda (on a CPU "
                             "training runs in fp32)")
        if self.stage("engine") is not None and self.target == "cpu":
            raise ValueError("stages: engine builds TensorRT engines, which run on target cuda, not cpu")
        return self

    def _check_jetson(self) -> None:
        """Engines for a Jetson are built on the Jetson: no local engine build, no local GPU bench; a bundle instead."""
        device = f"`deploykit bench ARTIFACT --host user@jetson` builds the engines on the {self.target} and times them there"
        if self.stage("engine") is not None:
            raise ValueError(f"stages: engine builds TensorRT engines on this machine, which a {self.target} cannot run "
                             f"(engines are built on the device): use a bundle stage; {device}")
        bundle = self.stage("bundle")
        if bundle is None:
            raise ValueError(f"stages: target {self.target} needs a bundle stage (after export): {device}")
        bench = self.stage("bench")
        if bench is not None:
            wrong = [b for b in bench.backends if b not in JETSON_LOCAL_BACKENDS]
            if wrong:
                raise ValueError(f"stages: bench backend {wrong[0]} would time this machine's GPU, not the {self.target}'s: "
                                 f"{device}; a local bench stage may only use {', '.join(JETSON_LOCAL_BACKENDS)}")
            if bench.precision != "fp32":
                raise ValueError(f"stages: bench precision {bench.precision}: the local bench of a Jetson target runs on "
                                 "the CPU in fp32; the device's fp16 figures come from `deploykit bench --host`")
        export = self.stage("export")
        if bundle.onnx == "fp16" and export is not None and not export.fp16:
            raise ValueError("stages: bundle.onnx fp16 ships the fp16 graphs: set export.fp16: true")
        if bundle.precision == "int8" and self.stage("quantize") is None:
            raise ValueError("stages: bundle.precision int8 needs INT8 QDQ UNets: add a quantize stage before the bundle")

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
