"""eval: FID and KID against the real data, PSNR / SSIM against the teacher, and a sample grid.

FID and KID score against one half of the real images; the other half gives the floor (real images
scored the same way), so the floor is never measured against images it contains.

SD pipelines have no data set here: their students are compared with the teacher image by image,
the same prompt and seed through both. A random-weights teacher is not evaluated at all.

When a quantize stage ran, the INT8 graphs (``teacher-int8``, ``student-int8``, run by ONNX Runtime)
sample from the same noise / prompts and seeds and are scored the same way, against the fp32 teacher.
"""

from __future__ import annotations

import torch

from deploykit.eval import (extract_features, feature_stats, frechet_distance, kernel_inception_distance, psnr_ssim,
                            save_comparison_grid, split_reference)
from deploykit.eval.fid import REAL_SPLIT_SEED
from deploykit.io import atomic_write_json
from deploykit.models import load_model
from deploykit.runtime import OnnxRuntimeBackend, TorchBackend, make_pipeline_scheduler, make_scheduler, sample_batched
from deploykit.stages.base import StageContext, StageSpec
from deploykit.stages.data import feature_extractor, is_pipeline, load_teacher_pipeline, teacher_meta, training_images


def _roles(ctx: StageContext) -> list[str]:
    roles = [r for r in ("teacher", "pruned", "student") if r in ctx.inputs]
    # "pruned" and "student" are the same folder when no recovery stage ran
    if "pruned" in roles and ctx.inputs.get("pruned") == ctx.inputs.get("student"):
        roles.remove("pruned")
    return roles


def _int8_roles(ctx: StageContext) -> dict:
    """``teacher-int8`` / ``student-int8`` -> their INT8 ONNX UNet, where a quantize stage made them."""
    if "onnx_int8" not in ctx.inputs:
        return {}
    paths = {f"{r}-int8": ctx.inputs["onnx_int8"] / r / "unet" / "model.onnx" for r in ("teacher", "student")}
    return {r: p for r, p in paths.items() if p.is_file()}


def _pipeline_samples(ctx: StageContext, meta: dict, role: str) -> torch.Tensor:
    cfg = ctx.config
    model = load_model(ctx.inputs[role.removesuffix("-int8")] / "model")
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
    cfg = ctx.config
    meta = teacher_meta(ctx.inputs["teacher"])
    if is_pipeline(meta):
        return _run_pipeline(ctx, meta)
    int8 = _int8_roles(ctx)
    roles = _roles(ctx) + list(int8)
    noise = torch.randn(cfg.num_samples, *meta["sample_shape"], generator=torch.Generator().manual_seed(ctx.seed))
    samples = {}
    for role in roles:
        backend = OnnxRuntimeBackend(int8[role]) if role in int8 else TorchBackend(load_model(ctx.inputs[role] / "model"))
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


EVAL = StageSpec(name="eval", version="3", reads=("teacher", "student"), optional_reads=("pruned", "onnx_int8"),
                 writes={"eval": "."}, run=run)
