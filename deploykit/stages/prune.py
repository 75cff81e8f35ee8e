"""prune: the teacher, structurally pruned to the recipe's MACs target."""

from __future__ import annotations

import torch

from deploykit.errors import InputError
from deploykit.io import atomic_write_json
from deploykit.models import load_model, save_model
from deploykit.prune import GradientData, PruneConfig, get_criterion, prune_to_macs
from deploykit.stages.base import StageContext, StageSpec
from deploykit.stages.data import example_inputs, noise_scheduler, teacher_meta, training_images


def run(ctx: StageContext) -> dict:
    cfg = ctx.config
    meta = teacher_meta(ctx.inputs["teacher"])
    teacher = load_model(ctx.inputs["teacher"] / "model")
    criterion = get_criterion(cfg.criterion)
    # MACs per sample: the search only needs ratios, and batch 1 traces fastest
    inputs = example_inputs(meta, teacher, 1, ctx.seed)
    forward_loop = calibration_forward = None
    if criterion.needs_data:
        images = training_images(meta)
        if images is None:
            images = torch.randn(cfg.batch_size * cfg.gradient_batches, *meta["sample_shape"])
            ctx.console.print(f"  [yellow]no data set known for this teacher: {cfg.criterion} from noise inputs[/]")
        # SD UNets also take the example text conditioning (and SDXL's text_embeds / time_ids)
        data = GradientData(images, noise_scheduler(meta), cfg.batch_size, cfg.gradient_batches, ctx.seed,
                            conditioning=tuple(inputs[2:]))
        if criterion.needs_gradients:
            forward_loop = criterion.gradient_loop(data)
        if criterion.needs_calibration:
            calibration_forward = criterion.calibration(data)

    config = PruneConfig(criterion=cfg.criterion, macs_target=cfg.macs_target, round_to=cfg.round_to,
                         ignored=None if cfg.ignored is None else tuple(cfg.ignored), max_layer_ratio=cfg.max_layer_ratio,
                         seed=ctx.seed)
    with ctx.progress("searching pruning ratio", config.search_steps) as advance:
        try:
            student, result = prune_to_macs(
                teacher, inputs, config, forward_loop,
                on_trial=lambda tr: advance(info=f"ratio {tr['pruning_ratio']:.3f} -> MACs {tr['macs_ratio']:.1%}"),
                calibration_forward=calibration_forward)
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
        "criterion_seconds": result.criterion_seconds,
        "search": result.trials,
        **result.calibration,  # block-removal: "block_ranking", least important first
    }
    atomic_write_json(ctx.out / "prune.json", summary)
    ctx.console.print(f"  MACs {result.macs_ratio:.1%} of the teacher's, params "
                      f"{result.params_after / result.params_before:.1%} (pruning ratio {result.pruning_ratio:.3f})")
    return {"macs_ratio": result.macs_ratio}


PRUNE = StageSpec(name="prune", version="2", reads=("teacher",), writes={"student": ".", "pruned": ".", "prune": "."},
                  run=run)
