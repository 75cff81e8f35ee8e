"""distill: recovery fine-tuning of the pruned student against the dense teacher.

A 2:4 student (masks beside its weights, from sparsify) leaves this stage 2:4, with its masks
(re-chosen under ``mask_mode: sr-ste``) written beside the recovered weights.
"""

from __future__ import annotations

import json

import torch

from deploykit.distill import RecoveryConfig, recover
from deploykit.io import atomic_write_json
from deploykit.models import load_model, save_model
from deploykit.runtime import make_scheduler, sample_batched
from deploykit.sparsity import MASKS_FILE, load_masks, save_masks
from deploykit.stages.base import StageContext, StageSpec
from deploykit.stages.data import noise_scheduler, teacher_meta, training_images


def _data(ctx: StageContext, meta: dict, teacher: torch.nn.Module) -> torch.Tensor:
    images = training_images(meta)
    if images is not None:
        return images
    # No data set known: the teacher's own samples are the data (data-free recovery).
    ctx.console.print("  no data set known for this teacher: recovering on 512 of its own samples")
    gen = torch.Generator().manual_seed(ctx.seed)
    noise = torch.randn(512, *meta["sample_shape"], generator=gen)
    with torch.no_grad():
        return sample_batched(lambda x, t: teacher(x, t).sample, make_scheduler("ddim", meta["scheduler_config"]),
                              noise, steps=25, batch_size=128)


def run(ctx: StageContext) -> dict:
    cfg = ctx.config
    meta = teacher_meta(ctx.inputs["teacher"])
    teacher = load_model(ctx.inputs["teacher"] / "model")
    student = load_model(ctx.inputs["student"] / "model")
    masks = load_masks(ctx.inputs["student"] / "model") if (ctx.inputs["student"] / "model" / MASKS_FILE).is_file() else None
    chosen = {k: v.clone() for k, v in masks.items()} if masks else None
    images = _data(ctx, meta, teacher)

    def batches(step: int, gen: torch.Generator) -> torch.Tensor:
        return images[torch.randint(0, len(images), (cfg.batch_size,), generator=gen)]

    config = RecoveryConfig(steps=cfg.steps, lr=cfg.lr, warmup_steps=cfg.warmup_steps,
                            denoise_weight=cfg.denoise_weight, output_kd_weight=cfg.output_kd_weight,
                            checkpoint_every=cfg.checkpoint_every, seed=ctx.seed, mask_mode=cfg.mask_mode,
                            sr_ste_decay=cfg.sr_ste_decay)
    checkpoints = ctx.work / "checkpoints"
    if (checkpoints / "checkpoint.json").is_file():
        step = json.loads((checkpoints / "checkpoint.json").read_text())["step"]
        ctx.console.print(f"  resuming from the checkpoint at step {step}")
    with ctx.progress("recovering student", cfg.steps) as advance:
        # a resumed run starts part-way: the bar counts from the checkpoint
        student, losses = recover(
            student, teacher, noise_scheduler(meta), batches, config, checkpoint_dir=checkpoints,
            on_step=lambda step, rec: advance(info=" ".join(f"{k} {v:.4f}" for k, v in rec.items() if k != "step")),
            masks=masks)
    save_model(student, ctx.out / "model")
    record = {"config": config.__dict__, "losses": losses}
    if masks:
        save_masks(ctx.out / "model", masks, metadata={"mask_mode": cfg.mask_mode})
        changed = sum(int((masks[k] != chosen[k]).sum()) for k in masks) / sum(m.numel() for m in masks.values())
        record["sparsity"] = {"mask_mode": cfg.mask_mode, "layers": len(masks), "mask_bits_changed": changed}
        ctx.console.print(f"  2:4 kept on {len(masks)} layers ({cfg.mask_mode}; {changed:.2%} of mask bits changed)")
    atomic_write_json(ctx.out / "distill.json", record)
    last = losses[-min(50, len(losses)):]
    mean = sum(r["loss"] for r in last) / len(last)
    ctx.console.print(f"  {cfg.steps} steps, loss over the last {len(last)}: {mean:.4f}")
    return {"final_loss": mean}


DISTILL = StageSpec(name="distill", version="1", reads=("teacher", "student"), writes={"student": "."}, run=run)
