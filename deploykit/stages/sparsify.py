"""sparsify: 2:4 masks on the student's eligible Linear / Conv2d weights, stored beside its weights.

The student is the pruned model where a prune stage ran, else the teacher itself (2:4 alone). The
masks go to ``model/sparsity_masks.safetensors``; distill enforces them, export checks them in the
ONNX graph, and the torch-cuda bench runs the masked layers on cuSPARSELt.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from deploykit.errors import InputError
from deploykit.io import atomic_write_json
from deploykit.models import load_model, save_model
from deploykit.models.wrappers import tensor_view
from deploykit.sparsity import SparsityConfig, eligible_layers, masks_summary, save_masks, sparsify
from deploykit.sparsity.masks import DEFAULT_EXCLUDE, DEFAULT_MIN_FEATURES
from deploykit.stages.base import MODEL_PACKAGES, Markdown, ReportContext, StageConfig, StageContext, StageSpec
from deploykit.stages.bounds import Batches, BatchSize
from deploykit.stages.data import example_inputs, noise_scheduler, teacher_meta, training_images
from deploykit.stages.footprint import Demand, Footprint


class SparsifyStage(StageConfig):
    """2:4 semi-structured masks on the student's eligible Linear / Conv2d weights (the teacher's without a prune stage)."""

    stage: Literal["sparsify"] = "sparsify"
    method: Literal["magnitude", "sparsegpt"] = Field("magnitude", description="sparsegpt needs nvidia-modelopt")
    include: list[str] = Field(default_factory=lambda: ["*"], min_length=1, description="fnmatch globs of layer names")
    exclude: list[str] = Field(default_factory=lambda: list(DEFAULT_EXCLUDE),
                               description=f"layers kept dense (default: {', '.join(DEFAULT_EXCLUDE)})")
    min_features: int = Field(DEFAULT_MIN_FEATURES, ge=0, le=1_000_000,
                              description="layers with fewer input or output channels stay dense (2:4 kernels do not win there)")
    calibration_batches: Batches = Field(4, description="sparsegpt: batches of calibration inputs")
    calibration_batch_size: BatchSize = 16


def memory(cfg: SparsifyStage, fp: Footprint) -> list[Demand]:
    if cfg.method != "sparsegpt":  # magnitude masks need no data
        return []
    return [Demand("sparsify.calibration_batches x sparsify.calibration_batch_size x resolution",
                   cfg.calibration_batches * cfg.calibration_batch_size * (fp.sample_bytes + fp.cond_bytes),
                   "the calibration inputs"),
            Demand("sparsify.calibration_batch_size x resolution", fp.unet_call(cfg.calibration_batch_size),
                   "a UNet call on one calibration batch")]


def _calibration_loop(ctx: StageContext, meta: dict, model: torch.nn.Module):
    """sparsegpt's data: the teacher's training images noised at random timesteps where it has them, else random inputs."""
    cfg = ctx.config
    images = training_images(meta)
    gen = torch.Generator().manual_seed(ctx.seed)
    batches = []
    for i in range(cfg.calibration_batches):
        inputs = list(example_inputs(meta, model, cfg.calibration_batch_size, ctx.seed + i))
        if images is not None:
            x0 = images[torch.randint(0, len(images), (cfg.calibration_batch_size,), generator=gen)]
            inputs[0] = noise_scheduler(meta).add_noise(x0, torch.randn(x0.shape, generator=gen), inputs[1])
        batches.append(inputs)

    def forward_loop(m: torch.nn.Module) -> None:
        view = tensor_view(m)
        with torch.no_grad():
            for inputs in batches:
                view(*inputs)

    return forward_loop


def run(ctx: StageContext) -> dict:
    cfg = ctx.config
    meta = teacher_meta(ctx.inputs["teacher"])
    source = "student" if "student" in ctx.inputs else "teacher"
    model = load_model(ctx.inputs[source] / "model")
    config = SparsityConfig(method=cfg.method, include=tuple(cfg.include), exclude=tuple(cfg.exclude),
                            min_features=cfg.min_features)
    eligibility = eligible_layers(model, config)
    if not eligibility.layers:
        widest = max((min(getattr(m, "in_features", 0) or getattr(m, "in_channels", 0),
                          getattr(m, "out_features", 0) or getattr(m, "out_channels", 0))
                      for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))), default=0)
        raise InputError(f"sparsify: no layer of the {source} is eligible for 2:4 (min_features {cfg.min_features}; its widest "
                         f"layer has min(C_in, C_out) = {widest}); lower sparsify.min_features or change include / exclude")
    forward_loop = _calibration_loop(ctx, meta, model) if cfg.method == "sparsegpt" else None
    with ctx.progress(f"2:4 masks ({cfg.method})", 1) as advance:
        masks = sparsify(model, config, forward_loop)
        advance(1)
    save_model(model, ctx.out / "model")
    save_masks(ctx.out / "model", masks, metadata={"method": cfg.method})
    summary = {"method": cfg.method, "source": source, **masks_summary(model, masks), "masked_layers": sorted(masks),
               "skipped": eligibility.skipped}
    atomic_write_json(ctx.out / "sparsify.json", summary)
    ctx.console.print(f"  {summary['layers']} layers 2:4 ({summary['share_of_params']:.1%} of the {source}'s weights under a "
                      f"mask, {summary['zeroed_weights'] / 1e6:.2f}M zeroed); {len(eligibility.skipped)} layers kept dense")
    return {"layers": summary["layers"], "share_of_params": summary["share_of_params"]}


def report_section(ctx: ReportContext) -> dict:
    sparsity = ctx.read_json("sparsify.json")
    return {"sparsity": {k: sparsity[k] for k in ("method", "layers", "masked_weights", "zeroed_weights", "share_of_params")}}


def markdown_rows(report: dict) -> Markdown | None:
    """One line, with what the later stages found: masks kept through distill, 2:4 in the ONNX graphs, cuSPARSELt."""
    if "sparsity" not in report:
        return None
    sp = report["sparsity"]
    line = (f"2:4 sparsity ({sp['method']}): {sp['layers']} layers, {sp['share_of_params']:.1%} of the student's weights "
            f"under a mask, {sp['zeroed_weights'] / 1e6:.2f}M zeroed")
    if "recovery" in sp:
        rec = sp["recovery"]
        line += f"; kept through distill ({rec['mask_mode']}, {rec['mask_bits_changed']:.2%} of mask bits changed)"
    for role, c in sp.get("onnx", {}).items():
        line += f"; {role} ONNX: {c['compliant']} of {c['layers']} masked weights 2:4"
    if "torch_cuda" in sp:
        cuda = sp["torch_cuda"]
        line += f"; torch-cuda ran {cuda['converted']} layers on {cuda['backend']} ({cuda['dtype']})"
    return Markdown(body=[line + "."])


SPARSIFY = StageSpec(name="sparsify", version="1", config=SparsifyStage, reads=("teacher",), optional_reads=("student",),
                     writes={"student": ".", "sparsity": "."}, run=run, depends_on=(*MODEL_PACKAGES, "nvidia-modelopt"),
                     memory=memory, report=report_section, markdown=markdown_rows)
