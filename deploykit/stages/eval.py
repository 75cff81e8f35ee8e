"""eval: FID and KID against the real data, PSNR / SSIM against the teacher, and a sample grid.

FID and KID score against one half of the real images; the other half gives the floor (real images
scored the same way), so the floor is never measured against images it contains.

SD pipelines have no data set here: their students are compared with the teacher image by image,
the same prompt and seed through both. A random-weights teacher is not evaluated at all.

When a quantize stage ran, the INT8 graphs (``teacher-int8``, ``student-int8``, run by ONNX Runtime)
sample from the same noise / prompts and seeds and are scored the same way, against the fp32 teacher.
"""

from __future__ import annotations

import shutil
from typing import Literal

import torch
from pydantic import Field

from deploykit.io import atomic_write_json
from deploykit.models import load_model
from deploykit.runtime import OnnxRuntimeBackend, TorchBackend, make_pipeline_scheduler, make_scheduler, sample_batched
from deploykit.stages.base import (
    COMPARED_MODELS,
    MODEL_PACKAGES,
    Markdown,
    PublishContext,
    ReportContext,
    StageConfig,
    StageContext,
    StageSpec,
)
from deploykit.stages.bounds import BatchSize, Samples, SamplingSteps
from deploykit.stages.data import feature_extractor, is_pipeline, load_teacher_pipeline, teacher_meta, training_images
from deploykit.stages.footprint import Demand, Footprint

DEFAULT_PROMPTS = ("a photograph of an astronaut riding a horse", "a red bicycle leaning on a brick wall",
                   "a bowl of ramen, studio lighting", "a lighthouse on a cliff at sunset")
# the direction in which each metric gets worse: loss = (int8 - fp32) * sign
WORSE = {"fid": 1.0, "psnr_vs_teacher": -1.0, "ssim_vs_teacher": -1.0}


class EvalStage(StageConfig):
    """Quality: FID on the zoo's features, PSNR / SSIM against the teacher, a sample grid.

    SD teachers: PSNR / SSIM of the student's images against the teacher's, from the same prompts and seeds.
    """

    stage: Literal["eval"] = "eval"
    num_samples: Samples = 512
    steps: SamplingSteps = Field(25, description="sampling steps per image")
    scheduler: Literal["ddim", "dpm-solver++", "euler"] = "ddim"
    prompts: list[str] = Field(default_factory=lambda: list(DEFAULT_PROMPTS), min_length=1,
                               description="SD teachers: prompts, cycled over num_samples")
    guidance_scale: float = Field(7.5, ge=1.0, le=50.0)
    batch_size: BatchSize = 128
    grid_samples: int = Field(32, ge=1, le=256)


def memory(cfg: EvalStage, fp: Footprint) -> list[Demand]:
    recipe = fp.recipe
    quantize = recipe.stage("quantize")
    models = 2 + (recipe.stage("distill") is not None) + (0 if quantize is None else 1 + quantize.teacher)
    # pixel UNets: every model's samples and the shared noise; pipelines: every model's decoded images
    held = cfg.num_samples * (fp.image_bytes * models if fp.pipeline else fp.sample_bytes * (models + 1))
    return [Demand("eval.num_samples x resolution", held, f"the samples of {models} models, kept for the metrics"),
            Demand("eval.batch_size x resolution", fp.unet_call(2 if fp.pipeline else cfg.batch_size,
                                                               materialized_attention=quantize is not None),
                   "a UNet call on one batch"),
            Demand("resolution", fp.vae_decode(), "decoding an image")]


def _roles(ctx: StageContext) -> list[str]:
    """The models compared, by their report names (``pruned``: the student before distill, where distill ran)."""
    return [name for name, role in COMPARED_MODELS.items() if role in ctx.inputs]


def _model_dir(ctx: StageContext, name: str):
    return ctx.inputs[COMPARED_MODELS[name]] / "model"


def _int8_roles(ctx: StageContext) -> dict:
    """``teacher-int8`` / ``student-int8`` -> their INT8 ONNX UNet, where a quantize stage made them."""
    if "onnx_int8" not in ctx.inputs:
        return {}
    paths = {f"{r}-int8": ctx.inputs["onnx_int8"] / r / "unet" / "model.onnx" for r in ("teacher", "student")}
    return {r: p for r, p in paths.items() if p.is_file()}


def _pipeline_samples(ctx: StageContext, meta: dict, role: str) -> torch.Tensor:
    cfg = ctx.config
    model = load_model(_model_dir(ctx, role.removesuffix("-int8")))
    if role.endswith("-int8"):
        from deploykit.runtime.onnx_unet import with_onnx_forward

        model = with_onnx_forward(_int8_roles(ctx)[role], model)
    pipe = load_teacher_pipeline(ctx.inputs["teacher"], model)
    pipe.scheduler = make_pipeline_scheduler(cfg.scheduler, dict(pipe.scheduler.config))
    images = []
    with ctx.progress(f"generating with the {role}", cfg.num_samples) as advance:
        for i in range(cfg.num_samples):
            out = pipe(cfg.prompts[i % len(cfg.prompts)], num_inference_steps=cfg.steps, guidance_scale=cfg.guidance_scale,
                       height=meta["resolution"], width=meta["resolution"], output_type="pt",
                       generator=torch.Generator().manual_seed(ctx.seed + i)).images
            images.append(out * 2 - 1)  # [0, 1] -> [-1, 1], as the metrics and grids take them
            advance(1)
    return torch.cat(images)


def _run_pipeline(ctx: StageContext, meta: dict) -> dict:
    from deploykit.eval import psnr_ssim, save_comparison_grid

    cfg = ctx.config
    roles = _roles(ctx) + list(_int8_roles(ctx))
    if meta.get("random_weights"):
        ctx.console.print("  [yellow]random weights: quality is not measured[/]")
        atomic_write_json(ctx.out / "eval.json", {"quality": {r: {} for r in roles}, "skipped": "random weights",
                                                  "num_samples": 0, "steps": cfg.steps, "scheduler": cfg.scheduler,
                                                  "reference": {}})
        return {}
    samples = {role: _pipeline_samples(ctx, meta, role) for role in roles}
    quality = {role: psnr_ssim(samples[role], samples["teacher"]) if role != "teacher" else {} for role in roles}
    save_comparison_grid(ctx.out / "samples.png", {r: samples[r][:cfg.grid_samples] for r in roles}, cols=4, scale=1)
    atomic_write_json(ctx.out / "eval.json", {
        "quality": quality, "num_samples": cfg.num_samples, "steps": cfg.steps, "scheduler": cfg.scheduler,
        "reference": {"compared_with": "the teacher's images from the same prompts and seeds",
                      "prompts": cfg.prompts, "guidance_scale": cfg.guidance_scale}})
    for role in roles[1:]:
        ctx.console.print(f"  {role}: " + ", ".join(f"{k} {v:.3f}" for k, v in quality[role].items()))
    return quality


def run(ctx: StageContext) -> dict:
    # (here, not at the top: deploykit.eval imports torchmetrics, seconds that loading a recipe need not spend)
    from deploykit.eval import (
        extract_features,
        feature_stats,
        frechet_distance,
        kernel_inception_distance,
        psnr_ssim,
        save_comparison_grid,
        split_reference,
    )
    from deploykit.eval.fid import REAL_SPLIT_SEED

    cfg = ctx.config
    meta = teacher_meta(ctx.inputs["teacher"])
    if is_pipeline(meta):
        return _run_pipeline(ctx, meta)
    int8 = _int8_roles(ctx)
    roles = _roles(ctx) + list(int8)
    noise = torch.randn(cfg.num_samples, *meta["sample_shape"], generator=torch.Generator().manual_seed(ctx.seed))
    samples = {}
    for role in roles:
        backend = OnnxRuntimeBackend(int8[role]) if role in int8 else TorchBackend(load_model(_model_dir(ctx, role)))
        scheduler = make_scheduler(cfg.scheduler, meta["scheduler_config"])
        total = cfg.steps * ((cfg.num_samples + cfg.batch_size - 1) // cfg.batch_size)
        with ctx.progress(f"sampling {role}", total) as advance:
            samples[role] = sample_batched(backend, scheduler, noise, cfg.steps, cfg.batch_size, advance)

    quality: dict[str, dict] = {role: {} for role in roles}
    extractor = feature_extractor(ctx.inputs["teacher"])
    real = training_images(meta)
    reference = {}
    if extractor is not None and real is not None:
        # The floor (real images scored like the samples, at the same count where the split allows) comes
        # from the half of the real images that the reference does not hold.
        reference_images, floor_images = split_reference(real)
        floor_images = floor_images[:cfg.num_samples]
        real_features = extract_features(extractor, reference_images)
        real_stats = feature_stats(real_features)

        def score(images: torch.Tensor):
            features = extract_features(extractor, images)
            return (frechet_distance(*feature_stats(features), *real_stats),
                    kernel_inception_distance(real_features, features, seed=ctx.seed))

        kid_std = {}
        for role in roles:
            quality[role]["fid"], kid = score(samples[role])
            quality[role]["kid"], kid_std[role] = kid.mean, kid.std
        floor_fid, floor_kid = score(floor_images)
        reference.update({
            "fid_real_subset": floor_fid, "kid_real_subset": floor_kid.mean,
            "fid_features": "zoo classifier, 128-d penultimate layer",
            "split": {"seed": REAL_SPLIT_SEED, "real_images": len(real), "reference_images": len(reference_images),
                      "floor_images": len(floor_images),
                      "rule": "real images in two disjoint halves: FID / KID reference, and the real-image floor"},
            "kid": {"subsets": floor_kid.subsets, "subset_size": floor_kid.subset_size, "std": kid_std,
                    "kernel": "(x.y / d + 1)^3, unbiased MMD^2 (Binkowski et al. 2018)"}})
    for role in roles:
        if role != "teacher":
            quality[role].update(psnr_ssim(samples[role], samples["teacher"]))

    n = min(cfg.grid_samples, cfg.num_samples)
    save_comparison_grid(ctx.out / "samples.png", {role: samples[role][:n] for role in roles})
    atomic_write_json(ctx.out / "eval.json", {"quality": quality, "reference": reference, "num_samples": cfg.num_samples,
                                              "steps": cfg.steps, "scheduler": cfg.scheduler})
    for role in roles:
        ctx.console.print(f"  {role}: " + ", ".join(f"{k} {v:.3f}" for k, v in quality[role].items()))
    return quality


def report_section(ctx: ReportContext) -> dict:
    evaluation = ctx.read_json("eval.json")
    quality = evaluation["quality"]
    out: dict = {name: {"quality": quality.get(name, {})} for name in ctx.entries}
    out["eval"] = {k: evaluation[k] for k in ("num_samples", "steps", "scheduler", "reference", "skipped") if k in evaluation}
    if "student-int8" in quality:  # what INT8 cost: the INT8 student against the fp32 one, on the same noise
        fp32, int8 = quality.get("student", {}), quality["student-int8"]
        out["int8"] = {"quality_loss": {m: (int8[m] - fp32[m]) * WORSE[m] for m in WORSE if m in fp32 and m in int8}}
    return out


def markdown_rows(report: dict) -> Markdown | None:
    if "eval" not in report:
        return None
    ev = report["eval"]
    if ev.get("skipped"):
        return Markdown(body=[f"Quality not measured: {ev['skipped']}."])
    if report.get("teacher_kind", "pixel") != "pixel":
        line = (f"Quality: {ev['num_samples']} images, {ev['steps']} {ev['scheduler']} steps; PSNR / SSIM of each "
                "model's images against the teacher's from the same prompts and seeds.")
    else:
        ref = ev.get("reference", {})
        line = (f"Quality: {ev['num_samples']} samples, {ev['steps']} {ev['scheduler'].upper()} steps, the same noise "
                "for every model. FID on the zoo classifier's features against the real data"
                + (f" (real images scored the same way: {ref['fid_real_subset']:.3f})" if "fid_real_subset" in ref else "")
                + "; PSNR / SSIM of each model's samples against the teacher's.")
    return Markdown(body=[line], figures=["![samples](samples/teacher_vs_student.png)"])


def publish(ctx: PublishContext) -> None:
    if (ctx.folder / "samples.png").is_file():
        shutil.copyfile(ctx.folder / "samples.png", ctx.into["samples"] / "teacher_vs_student.png")


EVAL = StageSpec(name="eval", version="3", config=EvalStage, reads=("teacher", "student"),
                 optional_reads=("student.pre_distill", "onnx_int8"), writes={"eval": "."}, run=run,
                 depends_on=(*MODEL_PACKAGES, "onnxruntime", "torchmetrics", "scipy"), memory=memory,
                 report=report_section, markdown=markdown_rows, publish=publish)
