"""distill: the pruned student, fine-tuned against the dense teacher with DaKD's loss terms.

The data never comes from outside: a zoo teacher brings its own training set; a Stable Diffusion
teacher is distilled on a prompt file: the teacher generates latents from the prompts, those are
noised, and its own predictions on them are the targets (the text embeddings of each prompt, and
the empty prompt's for one row in ten, go with them); any other teacher is distilled on its own samples.
Generated samples are kept in the stage's work folder, so a resumed run does not generate them again.

In one process inside ``deploykit build``; under ``accelerate launch`` every process runs this stage
(DDP, :mod:`deploykit.distill.trainer`), the main process first generates the data, and only it
writes. A 2:4 student (masks beside its weights, from sparsify) leaves this stage 2:4, with its
masks (re-chosen under ``mask_mode: sr-ste``) written beside the distilled weights.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, model_validator

from deploykit.distill import Batch, DistillConfig, DistillTrainer
from deploykit.distill.checkpoint import Checkpoint
from deploykit.distill.trainer import make_accelerator
from deploykit.errors import InputError
from deploykit.io import atomic_write_json, load_tensors, save_tensors
from deploykit.models import load_model, save_model
from deploykit.models.io_spec import SDXLUNetIO
from deploykit.runtime import make_pipeline_scheduler, make_scheduler, sample_batched
from deploykit.sparsity import MASKS_FILE, load_masks, save_masks
from deploykit.stages.base import MODEL_PACKAGES, Markdown, Preflight, PublishContext, ReportContext, StageConfig, StageContext, StageSpec
from deploykit.stages.bounds import BatchSize, LossWeight, Samples, SamplingSteps, StepCount, TrainingSteps
from deploykit.stages.data import is_pipeline, load_teacher_pipeline, noise_scheduler, read_prompts, teacher_meta, training_images
from deploykit.stages.footprint import Demand, Footprint

SAMPLES_FILE = "teacher_samples.safetensors"
# Stable Diffusion is trained with 10% of its captions dropped so that classifier-free guidance has an
# unconditional prediction to push against; the student needs one as well.
UNCOND_SHARE = 0.1
PROMPT_BATCH = 8  # prompts per generation call (x2 UNet rows under guidance)
FINAL_STEPS = 50  # the final loss is the mean over the last steps, on the console and in the report


class DistillStage(StageConfig):
    """Fine-tuning of the student against the dense teacher: DaKD's loss terms, each with a weight (0 turns it off).

    The defaults are denoising + output KD. Runs in one process inside ``deploykit build``, or over
    several processes / GPUs / machines when the build is started with ``accelerate launch`` (DDP).
    """

    stage: Literal["distill"] = "distill"
    steps: TrainingSteps = 300
    batch_size: BatchSize = Field(64, description="samples per optimizer step, over all processes and "
                                                  "accumulation steps")
    lr: float = Field(5e-4, gt=0, lt=1)
    warmup_steps: StepCount = 20
    denoise_weight: LossWeight = Field(1.0, description="||eps_student - eps||^2 (Diff-Pruning's recovery)")
    output_kd_weight: LossWeight = Field(1.0, description="||eps_student - eps_teacher||^2")
    feature_kd_weight: LossWeight = Field(0.0, description="block outputs, ||f_s - f_t||^2 / ||f_t||^2 (LAPTOP-Diff)")
    attention_kd_weight: LossWeight = Field(0.0, description="attention outputs, normalised like feature KD")
    distribution_kd_weight: LossWeight = Field(0.0, description="tau^2 KL(softmax(eps_t / tau) || softmax(eps_s / tau)) "
                                                                "over spatial positions")
    distribution_temperature: float = Field(1.0, gt=0, le=100, description="tau of the distribution term")
    adversarial_weight: LossWeight = Field(0.0, description="hinge GAN term of a small discriminator on the noise "
                                                            "prediction")
    adversarial_warmup: StepCount = Field(100, description="steps before the discriminator and its term start")
    discriminator_lr: float = Field(2e-4, gt=0, lt=1)
    mixed_precision: Literal["no", "fp16", "bf16"] = Field("no", description="autocast on GPUs (needs target cuda)")
    gradient_accumulation: int = Field(1, ge=1, le=1024, description="micro-batches per optimizer step")
    ema_decay: float = Field(0.0, ge=0, lt=1, description="EMA of the student's weights, saved as the result (0 = off)")
    checkpoint_every: TrainingSteps = 50
    mask_mode: Literal["fixed", "sr-ste"] = Field(
        "fixed", description="a 2:4 student's masks: fixed (re-applied after every step) or sr-ste (re-chosen every step "
                             "from the dense weights, straight-through gradients, decay on the pruned weights)")
    sr_ste_decay: float = Field(2e-4, ge=0, lt=1, description="sr-ste: lambda of the decay on masked-out weights")
    prompts: str | None = Field(None, min_length=1, description="Stable Diffusion teachers: a text file of prompts, one "
                                                                "per line (relative to the recipe)")
    teacher_samples: Samples = Field(512, description="teachers without a data set (SD, local folders): samples the "
                                                      "teacher generates as training data (SD: cycled over the prompts)")
    teacher_sample_steps: SamplingSteps = Field(25, description="DDIM steps per generated sample")
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


def check(cfg: DistillStage, recipe) -> None:
    if cfg.mixed_precision != "no" and recipe.target == "cpu":
        raise ValueError(f"distill.mixed_precision {cfg.mixed_precision} needs target cuda (on a CPU training runs in fp32)")


def memory(cfg: DistillStage, fp: Footprint) -> list[Demand]:
    micro = cfg.batch_size // cfg.gradient_accumulation
    return [Demand("distill.teacher_samples x resolution",
                   0 if fp.dataset else cfg.teacher_samples * (fp.sample_bytes + fp.cond_bytes),
                   "the teacher's generated training samples"),
            Demand("distill.batch_size / distill.gradient_accumulation x resolution",
                   fp.training_step(micro) + fp.unet_call(micro),
                   "the student's activations kept for its backward pass and the teacher's forward, on one micro-batch")]


def preflight(cfg: DistillStage, pf: Preflight) -> None:
    sd = pf.teacher_kind == "pipeline"
    if sd and cfg.prompts is None:
        raise InputError(f"{pf.where}: distill.prompts: Stable Diffusion teachers are distilled on prompts; name a text "
                         "file with one prompt per line (relative to the recipe)")
    if not sd and cfg.prompts is not None:
        raise InputError(f"{pf.where}: distill.prompts is for Stable Diffusion teachers; {pf.recipe.teacher} is a "
                         "pixel-space UNet, which is distilled on its data set or its own samples")
    if cfg.prompts is not None:
        read_prompts(pf.file(cfg.prompts))


def _cached(ctx: StageContext, make: Callable[[], dict[str, torch.Tensor]], is_main: bool) -> dict[str, torch.Tensor]:
    """Tensors kept in the work folder (our own file, read as safetensors): made once, by the main process."""
    path = ctx.work / SAMPLES_FILE
    if path.is_file():
        return load_tensors(path)
    tensors = make()
    if is_main:
        save_tensors(path, tensors)
    return tensors


def _own_samples(ctx: StageContext, meta: dict, teacher: torch.nn.Module, device: torch.device) -> torch.Tensor:
    cfg = ctx.config
    ctx.console.print(f"  no data set known for this teacher: distilling on {cfg.teacher_samples} of its own samples")
    noise = torch.randn(cfg.teacher_samples, *meta["sample_shape"], generator=torch.Generator().manual_seed(ctx.seed))
    model = teacher.to(device)
    with torch.no_grad():
        images = sample_batched(lambda x, t: model(x.to(device), t.to(device)).sample.cpu(),
                                make_scheduler("ddim", meta["scheduler_config"]), noise, steps=cfg.teacher_sample_steps,
                                batch_size=128)
    teacher.to("cpu")
    return images


def _encode(pipe, prompts: list[str], side: int, device: torch.device) -> tuple[dict[str, torch.Tensor],
                                                                              dict[str, torch.Tensor]]:
    """The UNet's conditioning for each prompt and for the empty prompt, as the pipeline itself makes them."""
    out = pipe.encode_prompt(prompt=prompts, device=device, num_images_per_prompt=1, do_classifier_free_guidance=True)
    cond, uncond = {"encoder_hidden_states": out[0]}, {"encoder_hidden_states": out[1][:1]}
    if len(out) == 4:  # SDXL: pooled text embeddings and the size / crop ids, as its pipeline makes them
        time_ids = torch.tensor([SDXLUNetIO.time_ids(side, side)], dtype=torch.float32, device=device)
        cond.update(text_embeds=out[2], time_ids=time_ids.expand(len(prompts), 6))
        uncond.update(text_embeds=out[3][:1], time_ids=time_ids)
    return ({k: v.float().cpu() for k, v in cond.items()}, {k: v.float().cpu() for k, v in uncond.items()})


def _prompt_samples(ctx: StageContext, meta: dict, teacher: torch.nn.Module, device: torch.device) -> dict[str, torch.Tensor]:
    """Latents the SD teacher generates from the prompt file, with each one's conditioning."""
    cfg = ctx.config
    prompts = read_prompts(Path(ctx.recipe_dir or ".") / cfg.prompts)
    chosen = [prompts[i % len(prompts)] for i in range(cfg.teacher_samples)]
    ctx.console.print(f"  generating {len(chosen)} teacher samples from {len(prompts)} prompts "
                      f"({cfg.teacher_sample_steps} DDIM steps, guidance {cfg.guidance_scale})")
    pipe = load_teacher_pipeline(ctx.inputs["teacher"], teacher).to(device)
    pipe.scheduler = make_pipeline_scheduler("ddim", dict(pipe.scheduler.config))
    latents, conds, uncond = [], [], {}
    with torch.no_grad(), ctx.progress("generating teacher samples", len(chosen)) as advance:
        for start in range(0, len(chosen), PROMPT_BATCH):
            batch = chosen[start:start + PROMPT_BATCH]
            gens = [torch.Generator().manual_seed(ctx.seed + start + i) for i in range(len(batch))]
            out = pipe(prompt=batch, num_inference_steps=cfg.teacher_sample_steps, guidance_scale=cfg.guidance_scale,
                       height=meta["resolution"], width=meta["resolution"], generator=gens, output_type="latent")
            latents.append(out.images.float().cpu())
            cond, uncond = _encode(pipe, batch, meta["resolution"], device)
            conds.append(cond)
            advance(len(batch))
    teacher.to("cpu")
    tensors = {"sample": torch.cat(latents)}
    tensors.update({f"cond.{k}": torch.cat([c[k] for c in conds]) for k in conds[0]})
    tensors.update({f"uncond.{k}": v for k, v in uncond.items()})
    return tensors


def _prompt_batches(tensors: dict[str, torch.Tensor], batch_size: int):
    samples = tensors["sample"]
    cond = {k.removeprefix("cond."): v for k, v in tensors.items() if k.startswith("cond.")}
    uncond = {k.removeprefix("uncond."): v for k, v in tensors.items() if k.startswith("uncond.")}

    def batches(step: int, gen: torch.Generator) -> Batch:
        idx = torch.randint(0, len(samples), (batch_size,), generator=gen)
        drop = torch.rand(batch_size, generator=gen) < UNCOND_SHARE
        rows = {k: torch.where(drop.view(-1, *[1] * (v.dim() - 1)), uncond[k], v[idx]) for k, v in cond.items()}
        return Batch(samples[idx], rows)

    return batches


def _batches(ctx: StageContext, meta: dict, teacher: torch.nn.Module, accelerator):
    cfg = ctx.config
    if is_pipeline(meta):
        tensors = _cached(ctx, lambda: _prompt_samples(ctx, meta, teacher, accelerator.device), accelerator.is_main_process)
        return _prompt_batches(tensors, cfg.batch_size)
    images = training_images(meta)
    if images is None:
        images = _cached(ctx, lambda: {"sample": _own_samples(ctx, meta, teacher, accelerator.device)},
                         accelerator.is_main_process)["sample"]

    def batches(step: int, gen: torch.Generator) -> torch.Tensor:
        return images[torch.randint(0, len(images), (cfg.batch_size,), generator=gen)]

    return batches


def _info(record: dict) -> str:
    return " ".join(f"{k} {v:.4f}" for k, v in record.items() if k != "step")


def run(ctx: StageContext) -> dict:
    cfg = ctx.config
    accelerator = make_accelerator(cfg.mixed_precision, cfg.gradient_accumulation)
    main = accelerator.is_main_process
    shards = accelerator.num_processes * cfg.gradient_accumulation
    if cfg.batch_size % shards:
        raise InputError(f"distill.batch_size {cfg.batch_size} does not split into {accelerator.num_processes} processes x "
                         f"gradient_accumulation {cfg.gradient_accumulation}; make it a multiple of {shards}")
    meta = teacher_meta(ctx.inputs["teacher"])
    teacher = load_model(ctx.inputs["teacher"] / "model")
    student = load_model(ctx.inputs["student"] / "model")
    masks = load_masks(ctx.inputs["student"] / "model") if (ctx.inputs["student"] / "model" / MASKS_FILE).is_file() else None
    chosen = {k: v.clone() for k, v in masks.items()} if masks else None
    with accelerator.main_process_first():  # the main process generates (and keeps) any data first
        batches = _batches(ctx, meta, teacher, accelerator)

    config = DistillConfig.from_fields(cfg, seed=ctx.seed)
    checkpoints = Checkpoint(ctx.work / "checkpoints")
    if checkpoints.exists():
        ctx.console.print(f"  resuming from the checkpoint at step {checkpoints.step()}")
    if accelerator.num_processes > 1:
        ctx.console.print(f"  {accelerator.num_processes} processes ({accelerator.distributed_type.value}), "
                          f"{cfg.batch_size // shards} samples each per micro-step")
    started = time.perf_counter()
    with ctx.progress("distilling the student", cfg.steps - checkpoints.step()) as advance:
        # a resumed run starts part-way: the bar counts from the checkpoint
        trainer = DistillTrainer(student, teacher, noise_scheduler(meta), batches, config, checkpoint_dir=checkpoints.folder,
                                 on_step=lambda step, rec: advance(info=_info(rec)), masks=masks, accelerator=accelerator)
        student, losses = trainer.train()
    if not main:
        return {}
    save_model(student, ctx.out / "model")
    # seconds: this run's training time (a resumed run counts from its checkpoint)
    record = {"config": config.__dict__, "losses": losses, "processes": accelerator.num_processes,
              "replica_digests": trainer.replica_digests, "seconds": round(time.perf_counter() - started, 1)}
    if masks:
        save_masks(ctx.out / "model", masks, metadata={"mask_mode": cfg.mask_mode})
        changed = sum(int((masks[k] != chosen[k]).sum()) for k in masks) / sum(m.numel() for m in masks.values())
        record["sparsity"] = {"mask_mode": cfg.mask_mode, "layers": len(masks), "mask_bits_changed": changed}
        ctx.console.print(f"  2:4 kept on {len(masks)} layers ({cfg.mask_mode}; {changed:.2%} of mask bits changed)")
    atomic_write_json(ctx.out / "distill.json", record)
    last = losses[-min(FINAL_STEPS, len(losses)):]
    mean = sum(r["loss"] for r in last) / len(last)
    ctx.console.print(f"  {cfg.steps} steps, loss over the last {len(last)}: {mean:.4f}"
                      + (" (EMA weights saved)" if cfg.ema_decay else ""))
    return {"final_loss": mean}


def report_section(ctx: ReportContext) -> dict:
    distill = ctx.read_json("distill.json")
    last = distill["losses"][-min(FINAL_STEPS, len(distill["losses"])):]
    config = distill["config"]
    out: dict = {"distill": {
        "steps": config["steps"], "final_loss": sum(r["loss"] for r in last) / len(last),
        "weights": {k.removesuffix("_weight"): v for k, v in config.items() if k.endswith("_weight") and v},
        "final_terms": {k: sum(r[k] for r in last if k in r) / max(1, sum(k in r for r in last))
                        for k in dict.fromkeys(k for r in last for k in r) if k not in ("step", "loss")},
        "ema_decay": config.get("ema_decay", 0.0), "processes": distill.get("processes", 1)}}
    if "sparsity" in distill:  # (report key kept from when this stage was called recovery)
        out["sparsity"] = {"recovery": distill["sparsity"]}
    return out


def markdown_rows(report: dict) -> Markdown | None:
    if "distill" not in report:
        return None
    d = report["distill"]
    terms = ", ".join(f"{k.replace('_', ' ')} {v:g}" for k, v in d.get("weights", {}).items())
    return Markdown(body=[f"Distill: {d['steps']} steps" + (f" ({terms})" if terms else "")
                          + (f", EMA {d['ema_decay']:g}" if d.get("ema_decay") else "")
                          + (f", {d['processes']} processes" if d.get("processes", 1) > 1 else "")
                          + f", final loss {d['final_loss']:.4f}."])


def publish(ctx: PublishContext) -> None:
    from deploykit.report.plots import loss_curve

    loss_curve(ctx.into["plots"] / "distill_loss.png", json.loads((ctx.folder / "distill.json").read_text())["losses"])


# The student it replaces stays available as student.pre_distill: the report's "pruned" model.
DISTILL = StageSpec(name="distill", version="2", config=DistillStage, reads=("teacher", "student"), writes={"student": "."},
                    supersedes={"student": "student.pre_distill"}, run=run, file_fields=("prompts",), distributed=True,
                    depends_on=(*MODEL_PACKAGES, "accelerate"), check=check, preflight=preflight, memory=memory,
                    report=report_section, markdown=markdown_rows, publish=publish)
