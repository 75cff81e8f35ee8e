"""prune: the teacher, structurally pruned to the recipe's MACs target."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from deploykit.errors import InputError
from deploykit.io import atomic_write_json
from deploykit.models import load_model, save_model
from deploykit.prune import DEFAULT_IGNORED, GradientData, PruneConfig, available, get_criterion, prune_to_macs
from deploykit.stages.base import COMPARED_MODELS, MODEL_PACKAGES, Markdown, Preflight, ReportContext, StageConfig, StageContext, StageSpec
from deploykit.stages.bounds import Batches, BatchSize
from deploykit.stages.data import example_inputs, noise_scheduler, teacher_meta, training_images
from deploykit.stages.footprint import Demand, Footprint

# Channel counts the target's kernels like: AVX-512 / oneDNN blocks of 8 floats on CPU; on GPUs, fp16
# tensor-core tiles want multiples of 64 for the widths to map onto whole tiles.
# AGX Orin has the same Ampere tensor cores (SM 8.7) and TensorRT's kernel library as a discrete GPU:
# 64, like cuda. Orin Nano: 32. Its recipes prune deeper (memory: see recipes/sd15_jetson_nano.yaml),
# and at SD1.5's narrowest level (320 channels) steps of 64 are 20% of the layer, too coarse for the MACs
# search to land near its target; 32 still keeps every width a multiple of the 8 that fp16 tensor-core
# MMAs need, and with only 8 SMs the Nano's GEMMs are small enough that TensorRT picks narrow tiles anyway.
# (Not measured on a Nano yet: `deploykit bench --host` on one is what settles it.)
ROUND_TO_BY_TARGET = {"cpu": 8, "cuda": 64, "jetson-agx-orin": 64, "jetson-orin-nano": 32}


class PruneStage(StageConfig):
    """Structured channel pruning with torch-pruning's DepGraph, to a MACs target found by search."""

    stage: Literal["prune"] = "prune"
    # the criteria deploykit.prune registers, offered by name
    criterion: Literal[tuple(available())] = Field(  # type: ignore[valid-type]
        "magnitude", description="importance criterion (deploykit.prune.importance)")
    macs_target: float = Field(0.5, gt=0.05, le=1.0, description="student MACs / teacher MACs, at most")
    round_to: int | None = Field(None, ge=1, le=256,
                                 description="keep channel counts multiples of this (default: by target, cpu 8, cuda 64)")
    ignored: list[str] | None = Field(
        None, description="fnmatch patterns of layers whose output channels stay dense (default: "
                          f"{', '.join(DEFAULT_IGNORED)}; SD UNets also conv_in and add_embedding.*)")
    max_layer_ratio: float = Field(0.9, gt=0, lt=1)
    attention: Literal["heads", "head_dims", "dense"] = Field(
        "heads", description="how attention widths shrink: whole heads (exact, keeps kernel-friendly head widths), "
                             "the same dims of every head (finer steps where a model has few heads), or not at all")
    gradient_batches: Batches = Field(4, description="batches for the gradient criteria and block-removal's calibration")
    batch_size: BatchSize = 64


def resolve(cfg: PruneStage, recipe) -> PruneStage:
    """``round_to`` by the recipe's target where the recipe leaves it out."""
    return cfg.model_copy(update={"round_to": cfg.round_to or ROUND_TO_BY_TARGET[recipe.target]})


def preflight(cfg: PruneStage, pf: Preflight) -> None:
    # gradient loops call model(x_t, t) without text conditioning; block-removal calibration has it
    if pf.teacher_kind == "pipeline" and get_criterion(cfg.criterion).needs_gradients:
        raise InputError(f"{pf.where}: prune.criterion {cfg.criterion} needs training images; for Stable "
                         "Diffusion UNets use magnitude, random or block-removal")


def memory(cfg: PruneStage, fp: Footprint) -> list[Demand]:
    criterion = get_criterion(cfg.criterion)
    if not criterion.needs_data:  # the MACs search alone runs at batch 1
        return []
    return [Demand("prune.batch_size x prune.gradient_batches x resolution",
                   0 if fp.dataset else cfg.batch_size * cfg.gradient_batches * fp.sample_bytes, "the criterion's noise inputs"),
            Demand("prune.batch_size x resolution",
                   fp.training_step(cfg.batch_size) if criterion.needs_gradients else fp.unet_call(cfg.batch_size),
                   "a UNet call on one batch" + (" kept for its backward pass" if criterion.needs_gradients else ""))]


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
                         attention=cfg.attention, seed=ctx.seed)
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
        "attention": cfg.attention,
        "macs_target": cfg.macs_target,
        "macs_per_sample_teacher": result.macs_before,
        "macs_per_sample_student": result.macs_after,
        "macs_ratio": result.macs_ratio,
        # convolutions and linear layers only, as published tables (BK-SDM's 338.7 G for SD1.5) count them
        "macs_dense_layers_per_sample_teacher": result.macs_dense_layers_before,
        "macs_dense_layers_per_sample_student": result.macs_dense_layers_after,
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


def report_section(ctx: ReportContext) -> dict:
    prune = ctx.read_json("prune.json")
    out: dict = {}
    for name in (e for e in ctx.entries if e in COMPARED_MODELS):
        # MACs per sample here; a bench stage replaces them with its count at its batch
        model = "teacher" if name == "teacher" else "student"
        out[name] = {"params": prune[f"params_{model}"], "macs_per_sample": prune[f"macs_per_sample_{model}"],
                     "macs": prune[f"macs_per_sample_{model}"]}
        if f"macs_dense_layers_per_sample_{model}" in prune:  # prune.json of version 3 on
            out[name]["macs_dense_layers"] = prune[f"macs_dense_layers_per_sample_{model}"]
    out["macs_ratio"] = prune["macs_ratio"]
    out["params_ratio"] = prune["params_student"] / prune["params_teacher"]
    out["prune"] = {k: prune[k] for k in ("criterion", "macs_target", "pruning_ratio")}
    return out


def markdown_rows(report: dict) -> Markdown | None:
    if "prune" not in report:
        return None
    dense = [report.get(m, {}).get("macs_dense_layers") for m in ("student", "teacher")]
    dense_note = f" (convolutions and linear layers only: {dense[0] / dense[1]:.3f})" if all(dense) else ""
    return Markdown(body=[
        f"MACs ratio (student / teacher, attention included): {report['macs_ratio']:.3f}{dense_note}; params ratio "
        f"{report['params_ratio']:.3f}; criterion `{report['prune']['criterion']}`, pruning ratio "
        f"{report['prune']['pruning_ratio']:.3f}."])


PRUNE = StageSpec(name="prune", version="3", config=PruneStage, reads=("teacher",), writes={"student": ".", "prune": "."},
                  run=run, depends_on=(*MODEL_PACKAGES, "torch-pruning"), resolve=resolve, preflight=preflight, memory=memory,
                  report=report_section, markdown=markdown_rows)
