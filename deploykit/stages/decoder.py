"""decoder: a smaller VAE decoder for the student pipeline, distilled from the teacher's decoder.

Pruning shrinks the UNet; the text encoder and the VAE decoder stay dense and bound what a user waits
for per image (on SD1.5 at 512x512 the decoder costs as much as several UNet steps). This stage puts a
TAESD-style tiny decoder (:mod:`deploykit.models.vae_decoder`) in the student pipeline: it generates
latents with the teacher pipeline from a prompt file, trains the tiny decoder to decode them as the
teacher's decoder does (:mod:`deploykit.distill.decoder`), and measures it on latents held out of
training: PSNR / SSIM of its images against the teacher decoder's, MACs and decode time of both.

Writes the role ``student.vae_decoder`` (``decoder.safetensors`` + ``decoder.json``, what rebuilds it).
export puts it into the student's ONNX pipeline (``onnx/student/vae_decoder/``), so ONNX Runtime, the
runtime, the bundle and eval use it; the artifact's ``model/vae_decoder/`` holds it for the torch runtime.

Why a tiny decoder rather than a pruned one: measured on the zoo:shapes teacher (benchmarks/t2i_cpu.py,
docs/text-to-image.md), at the same distillation budget.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Annotated, Literal

import torch
from pydantic import Field, field_validator

from deploykit.errors import InputError
from deploykit.io import atomic_write_json
from deploykit.models import load_model
from deploykit.models.vae_decoder import save_decoder, tiny_decoder_for
from deploykit.runtime import make_pipeline_scheduler
from deploykit.stages.base import MODEL_PACKAGES, Markdown, Preflight, PublishContext, ReportContext, StageConfig, StageContext, StageSpec
from deploykit.stages.bounds import BatchSize, Runs, Samples, SamplingSteps, StepCount, TrainingSteps
from deploykit.stages.data import DECODER_ROLE, is_pipeline, load_teacher_pipeline, read_prompts, teacher_meta

FOLDER = "vae_decoder"
LATENTS_FILE = "latents.safetensors"
PROMPT_BATCH = 16
TAESD_WIDTH = 64  # TAESD's width at every level (SD, SDXL); narrower teachers get their full-resolution width


class DecoderStage(StageConfig):
    """A TAESD-style tiny VAE decoder for the student pipeline, distilled from the teacher's decoder on the teacher's
    own latents (generated from a prompt file)."""

    stage: Literal["decoder"] = "decoder"
    method: Literal["tiny"] = Field("tiny", description="tiny: diffusers' DecoderTiny (TAESD's decoder), trained here")
    width: int | None = Field(None, ge=4, le=1024, description="channels at every level (default: the teacher decoder's "
                                                               f"full-resolution width, at most {TAESD_WIDTH})")
    num_blocks: list[Annotated[int, Field(ge=1, le=16)]] | None = Field(None, min_length=1, max_length=8,
                                         description="residual blocks per level, lowest resolution first (default: 3 per "
                                                     "level and 1 at full resolution, as TAESD)")
    prompts: str = Field(min_length=1, description="a text file of prompts, one per line (relative to the recipe): the "
                                                   "teacher generates the latents the decoder learns from")
    samples: Samples = Field(256, ge=2, description="latents the teacher generates (cycled over the prompts)")
    sample_steps: SamplingSteps = Field(20, description="DDIM steps per generated latent")
    guidance_scale: float = Field(7.5, ge=1.0, le=50.0)
    held_out: float = Field(0.125, gt=0, lt=1, description="share of the latents kept out of training to measure the decoder on")
    steps: TrainingSteps = 1000
    batch_size: BatchSize = 16
    lr: float = Field(2e-3, gt=0, lt=1)
    warmup_steps: StepCount = 50
    timing_runs: Runs = Field(20, description="interleaved decode pairs timed on the held-out latents")

    @field_validator("num_blocks")
    @classmethod
    def _positive(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and any(n < 1 or n > 16 for n in v):
            raise ValueError("every level needs 1 to 16 blocks")
        return v


def preflight(cfg: DecoderStage, pf: Preflight) -> None:
    if pf.teacher_kind != "pipeline":
        raise InputError(f"{pf.where}: decoder shrinks a Stable Diffusion pipeline's VAE decoder; teacher "
                         f"{pf.recipe.teacher} is a pixel-space UNet, which has none")
    read_prompts(pf.file(cfg.prompts))


def _latents(ctx: StageContext, meta: dict) -> torch.Tensor:
    """The teacher pipeline's latents for the prompt file, as ``vae.decode`` receives them (divided by the scaling
    factor); kept in the work folder, so a re-run after a failure does not generate them again."""
    from deploykit.io import load_tensors, save_tensors

    path = ctx.work / LATENTS_FILE
    if path.is_file():
        return load_tensors(path)["latents"]
    cfg = ctx.config
    prompts = read_prompts(Path(ctx.recipe_dir or ".") / cfg.prompts)
    chosen = [prompts[i % len(prompts)] for i in range(cfg.samples)]
    pipe = load_teacher_pipeline(ctx.inputs["teacher"], load_model(ctx.inputs["teacher"] / "model"))
    pipe.scheduler = make_pipeline_scheduler("ddim", dict(pipe.scheduler.config))
    out = []
    with torch.no_grad(), ctx.progress("generating teacher latents", len(chosen)) as advance:
        for start in range(0, len(chosen), PROMPT_BATCH):
            batch = chosen[start:start + PROMPT_BATCH]
            gens = [torch.Generator().manual_seed(ctx.seed + start + i) for i in range(len(batch))]
            latents = pipe(batch, num_inference_steps=cfg.sample_steps, guidance_scale=cfg.guidance_scale,
                           height=meta["resolution"], width=meta["resolution"], generator=gens, output_type="latent").images
            out.append(latents.float() / pipe.vae.config.scaling_factor)
            advance(len(batch))
    latents = torch.cat(out)
    save_tensors(path, {"latents": latents})
    return latents


def _macs(fn, z: torch.Tensor) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        fn(z)
    return counter.get_total_flops() // 2


def run(ctx: StageContext) -> dict:
    from diffusers import AutoencoderKL

    from deploykit.bench import measure_pair
    from deploykit.distill.decoder import DecoderDistillConfig, distill_decoder
    from deploykit.eval import psnr_ssim
    from deploykit.models import count_params
    from deploykit.stages.data import PIPELINE_DIR

    cfg = ctx.config
    meta = teacher_meta(ctx.inputs["teacher"])
    if not is_pipeline(meta):
        raise InputError("decoder: the teacher is not a Stable Diffusion pipeline")
    vae = AutoencoderKL.from_pretrained(ctx.inputs["teacher"] / PIPELINE_DIR / "vae", use_safetensors=True).eval()
    levels = len(vae.config.block_out_channels)
    width = cfg.width or min(TAESD_WIDTH, vae.config.block_out_channels[0])
    num_blocks = cfg.num_blocks or [3] * (levels - 1) + [1]
    try:
        student = tiny_decoder_for(vae, [width] * levels, num_blocks)
    except ValueError as e:
        raise InputError(f"decoder.num_blocks: {e}") from None
    latents = _latents(ctx, meta)
    held = max(1, round(len(latents) * cfg.held_out))
    train, test = latents[:-held], latents[-held:]

    def teacher_decode(z: torch.Tensor) -> torch.Tensor:
        return vae.decode(z).sample

    config = DecoderDistillConfig(steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr, warmup_steps=cfg.warmup_steps,
                                  seed=ctx.seed)
    started = time.perf_counter()
    with ctx.progress("distilling the tiny decoder", cfg.steps) as advance:
        losses = distill_decoder(student, teacher_decode, train, config, lambda step, loss: advance(info=f"loss {loss:.4f}"))
    seconds = time.perf_counter() - started
    with torch.no_grad():
        fidelity = psnr_ssim(student(test).clamp(-1, 1), teacher_decode(test).clamp(-1, 1))
        timing = measure_pair(lambda: teacher_decode(test), lambda: student(test), 2, cfg.timing_runs)
    save_decoder(student, ctx.out / FOLDER)
    teacher_params = count_params(vae.decoder) + count_params(vae.post_quant_conv)
    record = {
        "method": cfg.method, "decoder": student.settings, "train_latents": len(train), "held_out_latents": len(test),
        "steps": cfg.steps, "seconds": round(seconds, 1), "losses": losses,
        "quality": {k.removesuffix("_vs_teacher") + "_vs_teacher_decoder": v for k, v in fidelity.items()},
        "teacher": {"params": teacher_params, "macs_per_image": _macs(teacher_decode, test[:1])},
        "student": {"params": count_params(student), "macs_per_image": _macs(student, test[:1])},
        "latency": {"batch": len(test), "teacher_p50_ms": timing.teacher.p50_ms, "student_p50_ms": timing.student.p50_ms,
                    "speedup": timing.speedup, "runs": timing.teacher.runs, "backend": "torch-cpu"},
    }
    atomic_write_json(ctx.out / "decoder.json", record)
    q = record["quality"]
    ctx.console.print(f"  tiny decoder (width {width}, blocks {num_blocks}): {record['student']['params'] / 1e3:.0f}k params, "
                      f"{record['student']['macs_per_image'] / record['teacher']['macs_per_image']:.1%} of the teacher "
                      f"decoder's MACs; PSNR {q['psnr_vs_teacher_decoder']:.2f} dB against it on {len(test)} held-out "
                      f"latents; decode {timing.speedup:.2f}x faster (torch-cpu)")
    return {"psnr_vs_teacher_decoder": q["psnr_vs_teacher_decoder"]}


def report_section(ctx: ReportContext) -> dict:
    record = ctx.read_json("decoder.json")
    return {"decoder": {k: record[k] for k in ("method", "decoder", "quality", "teacher", "student", "latency", "steps",
                                               "train_latents", "held_out_latents", "seconds")}}


def markdown_rows(report: dict) -> Markdown | None:
    if "decoder" not in report:
        return None
    d = report["decoder"]
    t, s, q, lat = d["teacher"], d["student"], d["quality"], d["latency"]
    return Markdown(body=[
        f"VAE decoder: a tiny decoder (width {d['decoder']['block_out_channels'][0]}, blocks {d['decoder']['num_blocks']}) "
        f"in the student pipeline, distilled for {d['steps']} steps on {d['train_latents']} teacher latents: "
        f"{s['params'] / 1e3:.0f}k params against {t['params'] / 1e3:.0f}k, {s['macs_per_image'] / 1e6:.1f}M MACs per image "
        f"against {t['macs_per_image'] / 1e6:.1f}M; on {d['held_out_latents']} held-out latents its images are "
        f"{q['psnr_vs_teacher_decoder']:.2f} dB PSNR / {q['ssim_vs_teacher_decoder']:.3f} SSIM from the teacher decoder's, "
        f"and it decodes {lat['speedup']:.2f}x faster ({lat['backend']}, batch {lat['batch']}: "
        f"{lat['teacher_p50_ms']:.1f} -> {lat['student_p50_ms']:.1f} ms)."])


def publish(ctx: PublishContext) -> None:
    """The decoder beside the student's weights, for the torch runtime (ONNX has it in onnx/vae_decoder/)."""
    shutil.copytree(ctx.folder / FOLDER, ctx.into["model"] / FOLDER, dirs_exist_ok=True)


DECODER = StageSpec(name="decoder", version="1", config=DecoderStage, reads=("teacher",), writes={DECODER_ROLE: FOLDER},
                    run=run, file_fields=("prompts",), preflight=preflight, report=report_section,
                    depends_on=MODEL_PACKAGES, machine=True,  # it times the two decoders
                    markdown=markdown_rows, publish=publish)
