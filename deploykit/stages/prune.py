"""prune: the teacher, structurally pruned to the recipe's MACs target."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from deploykit.errors import InputError
from deploykit.io import atomic_write_json
from deploykit.models import load_model, save_model
from deploykit.prune import PruneConfig, get_criterion, prune_to_macs
from deploykit.stages.base import StageContext, StageSpec
from deploykit.stages.data import example_inputs, noise_scheduler, teacher_meta, training_images


def _denoising_forward_loop(meta: dict, images: torch.Tensor, batches: int, batch_size: int, seed: int):
    """Gradients for gradient criteria: the denoising loss on the teacher's data, fixed seeds."""
    scheduler = noise_scheduler(meta)

    def forward_loop(model: torch.nn.Module) -> None:
        gen = torch.Generator().manual_seed(seed)
        for _ in range(batches):
            x0 = images[torch.randint(0, len(images), (batch_size,), generator=gen)]
            noise = torch.randn(x0.shape, generator=gen)
            t = torch.randint(0, scheduler.config.num_train_timesteps, (batch_size,), generator=gen)
            F.mse_loss(model(scheduler.add_noise(x0, noise, t), t).sample, noise).backward()

    return forward_loop


def run(ctx: StageContext) -> dict:
    cfg = ctx.config
    meta = teacher_meta(ctx.inputs["teacher"])
    teacher = load_model(ctx.inputs["teacher"] / "model")
    forward_loop = None
    if get_criterion(cfg.criterion).needs_gradients:
        images = training_images(meta)
        if images is None:
            images = torch.randn(cfg.batch_size * cfg.gradient_batches, *meta["sample_shape"])
            ctx.console.print("  [yellow]no data set known for this teacher: gradients from noise inputs[/]")
        forward_loop = _denoising_forward_loop(meta, images, cfg.gradient_batches, cfg.batch_size, ctx.seed)

    config = PruneConfig(criterion=cfg.criterion, macs_target=cfg.macs_target, round_to=cfg.round_to,
                         ignored=tuple(cfg.ignored), max_layer_ratio=cfg.max_layer_ratio, seed=ctx.seed)
    # MACs per sample: the search only needs ratios, and batch 1 traces fastest
    x, t = example_inputs(meta, 1, ctx.seed)
    with ctx.progress("searching pruning ratio", config.search_steps) as advance:
        try:
            student, result = prune_to_macs(
                teacher, (x, t), config, forward_loop,
                on_trial=lambda tr: advance(info=f"ratio {tr['pruning_ratio']:.3f} -> MACs {tr['macs_ratio']:.1%}"))
        except ValueError as e:  # a target the recipe asks for and the model cannot reach
            raise InputError(f"prune.macs_target: {e}") from None
    save_model(student, ctx.out / "model")
    summary = {
        "criterion": cfg.criterion,
        "macs_target": cfg.macs_target,
        "macs_per_sample_teacher": result.macs_before,
        "macs_per_sample_student": result.macs_after,
        "macs_ratio": result.macs_ratio,
        "params_teacher": result.params_before,
        "params_student": result.params_after,
        "pruning_ratio": result.pruning_ratio,
        "search": result.trials,
    }
    atomic_write_json(ctx.out / "prune.json", summary)
    ctx.console.print(f"  MACs {result.macs_ratio:.1%} of the teacher's, params "
                      f"{result.params_after / result.params_before:.1%} (pruning ratio {result.pruning_ratio:.3f})")
    return {"macs_ratio": result.macs_ratio}


PRUNE = StageSpec(name="prune", version="1", reads=("teacher",), writes={"student": ".", "pruned": "."}, run=run)
