"""eval: FID against the real data, PSNR / SSIM against the teacher, and a sample grid."""

from __future__ import annotations

import torch

from deploykit.eval import extract_features, feature_stats, fid, frechet_distance, psnr_ssim, save_comparison_grid
from deploykit.io import atomic_write_json
from deploykit.models import load_model
from deploykit.runtime import TorchBackend, make_scheduler, sample_batched
from deploykit.stages.base import StageContext, StageSpec
from deploykit.stages.data import feature_extractor, teacher_meta, training_images


def run(ctx: StageContext) -> dict:
    cfg = ctx.config
    meta = teacher_meta(ctx.inputs["teacher"])
    roles = [r for r in ("teacher", "pruned", "student") if r in ctx.inputs]
    # "pruned" and "student" are the same folder when no recovery stage ran
    if "pruned" in roles and ctx.inputs.get("pruned") == ctx.inputs.get("student"):
        roles.remove("pruned")
    noise = torch.randn(cfg.num_samples, *meta["sample_shape"], generator=torch.Generator().manual_seed(ctx.seed))
    samples = {}
    for role in roles:
        backend = TorchBackend(load_model(ctx.inputs[role] / "model"))
        scheduler = make_scheduler(cfg.scheduler, meta["scheduler_config"])
        total = cfg.steps * ((cfg.num_samples + cfg.batch_size - 1) // cfg.batch_size)
        with ctx.progress(f"sampling {role}", total) as advance:
            samples[role] = sample_batched(backend, scheduler, noise, cfg.steps, cfg.batch_size, advance)

    quality: dict[str, dict] = {role: {} for role in roles}
    extractor = feature_extractor(ctx.inputs["teacher"])
    real = training_images(meta)
    reference = {}
    if extractor is not None and real is not None:
        real_stats = feature_stats(extract_features(extractor, real))
        for role in roles:
            quality[role]["fid"] = fid(extractor, samples[role], real_stats)
        # The floor: real images scored like the samples (same count), against all of them.
        subset = real[torch.randperm(len(real), generator=torch.Generator().manual_seed(ctx.seed))[:cfg.num_samples]]
        reference["fid_real_subset"] = frechet_distance(*feature_stats(extract_features(extractor, subset)), *real_stats)
        reference["fid_features"] = "zoo classifier, 128-d penultimate layer"
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


EVAL = StageSpec(name="eval", version="1", reads=("teacher", "student"), optional_reads=("pruned",),
                 writes={"eval": "."}, run=run)
