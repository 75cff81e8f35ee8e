"""eval: FID and KID against the real data, PSNR / SSIM against the teacher, and a sample grid.

FID and KID score against one half of the real images; the other half gives the floor (real images
scored the same way), so the floor is never measured against images it contains.

SD pipelines have no data set here: their students are compared with the teacher image by image,
the same prompt and seed through both. A text-to-image zoo teacher also brings its judge: prompt
accuracy (the share of asked attributes its attribute classifier reads back, overall, per attribute,
and split into attribute combinations the teacher was trained on and those held out) and FID on that
classifier's features against rendered images of the same prompts, on the zoo's own evaluation
prompts (kept apart from the prompts distill uses). Any SD teacher gets CLIP score where the recipe
names CLIP weights (``clip_model``). A random-weights teacher is not evaluated at all.

When a quantize stage ran, the INT8 graphs (``teacher-int8``, ``student-int8``, run by ONNX Runtime)
sample from the same noise / prompts and seeds and are scored the same way, against the fp32 teacher.
A decoder stage's smaller VAE decoder decodes the student's images (and the INT8 student's): the
student is scored as it ships.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field

from deploykit.artifact import digest, hash_folder
from deploykit.errors import InputError
from deploykit.io import atomic_write_json
from deploykit.models import load_model
from deploykit.runtime import OnnxRuntimeBackend, TorchBackend, make_pipeline_scheduler, make_scheduler, sample_batched
from deploykit.stages.base import (
    COMPARED_MODELS,
    MODEL_PACKAGES,
    Markdown,
    Preflight,
    PublishContext,
    ReportContext,
    StageConfig,
    StageContext,
    StageSpec,
)
from deploykit.stages.bounds import BatchSize, Samples, SamplingSteps
from deploykit.stages.data import (
    DECODER_ROLE,
    feature_extractor,
    is_pipeline,
    load_teacher_pipeline,
    read_prompts,
    teacher_meta,
    training_images,
)
from deploykit.stages.footprint import Demand, Footprint

DEFAULT_PROMPTS = ("a photograph of an astronaut riding a horse", "a red bicycle leaning on a brick wall",
                   "a bowl of ramen, studio lighting", "a lighthouse on a cliff at sunset")
# the direction in which each metric gets worse: loss = (int8 - fp32) * sign
WORSE = {"fid": 1.0, "psnr_vs_teacher": -1.0, "ssim_vs_teacher": -1.0, "prompt_accuracy": -1.0,
         "prompt_accuracy_trained": -1.0, "prompt_accuracy_held_out": -1.0, "clip_score": -1.0}
PIXEL_BATCH, PIPELINE_BATCH = 128, 8  # default samples per call: pixel UNets, SD prompts (x2 UNet rows under guidance)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class EvalStage(StageConfig):
    """Quality: FID on the zoo's features, PSNR / SSIM against the teacher, a sample grid.

    SD teachers: PSNR / SSIM of the student's images against the teacher's, from the same prompts and seeds;
    a zoo text-to-image teacher adds prompt accuracy and FID on its attribute classifier; ``clip_model`` adds
    CLIP score.
    """

    stage: Literal["eval"] = "eval"
    num_samples: Samples = Field(512, description="images per model (SD: prompts cycled)")
    steps: SamplingSteps = Field(25, description="sampling steps per image")
    scheduler: Literal["ddim", "dpm-solver++", "euler"] = "ddim"
    prompts: list[str] | None = Field(None, min_length=1,
                                      description="SD teachers: prompts, cycled over num_samples (default: a zoo "
                                                  "teacher's own evaluation prompts, else four generic ones)")
    clip_model: str | None = Field(None, min_length=1, max_length=1000,
                                   description="SD teachers: CLIP weights for CLIP score, a local folder (relative to "
                                               "the recipe) or a hub id (read from the hub cache when offline)")
    guidance_scale: float = Field(7.5, ge=1.0, le=50.0)
    batch_size: BatchSize | None = Field(None, description=f"samples per model call (default {PIXEL_BATCH}; SD: prompts per pipeline "
                                               f"call, default {PIPELINE_BATCH})")
    grid_samples: int = Field(32, ge=1, le=256)


def memory(cfg: EvalStage, fp: Footprint) -> list[Demand]:
    recipe = fp.recipe
    quantize = recipe.stage("quantize")
    models = 2 + (recipe.stage("distill") is not None) + (0 if quantize is None else 1 + quantize.teacher)
    # pixel UNets: every model's samples and the shared noise; pipelines: every model's decoded images
    held = cfg.num_samples * (fp.image_bytes * models if fp.pipeline else fp.sample_bytes * (models + 1))
    return [Demand("eval.num_samples x resolution", held, f"the samples of {models} models, kept for the metrics"),
            Demand("eval.batch_size x resolution", fp.unet_call(2 if fp.pipeline else cfg.batch_size or PIXEL_BATCH,
                                                               materialized_attention=quantize is not None),
                   "a UNet call on one batch"),
            Demand("resolution", fp.vae_decode(), "decoding an image")]


def _clip_source(value: str, base: Path | None) -> str | Path:
    """A local folder (relative to the recipe) where one exists, else the hub id as written."""
    local = Path(value) if base is None or Path(value).is_absolute() else base / value
    return local if local.is_dir() else value


def preflight(cfg: EvalStage, pf: Preflight) -> None:
    if cfg.clip_model is not None:
        if pf.teacher_kind != "pipeline":
            raise InputError(f"{pf.where}: eval.clip_model scores images against prompts; teacher {pf.recipe.teacher} "
                             "is an unconditional pixel-space UNet")
        if not isinstance(_clip_source(cfg.clip_model, pf.recipe_dir), Path) and not _HUB_ID.match(cfg.clip_model):
            raise InputError(f"{pf.where}: eval.clip_model {cfg.clip_model}: no such folder next to the recipe, and not "
                             "a hub id (ORG/NAME)")
    if cfg.prompts is not None and zoo_evaluation_prompts(pf.recipe.teacher) is not None:
        from deploykit.zoo.shapes import parse_prompt

        for prompt in cfg.prompts:  # the attribute classifier checks each image against what its prompt asked for
            try:
                parse_prompt(prompt)
            except ValueError as e:
                raise InputError(f"{pf.where}: eval.prompts: {e}") from None
    _check_prompts_apart(cfg, pf)


def _check_prompts_apart(cfg: EvalStage, pf: Preflight) -> None:
    """A zoo teacher's evaluation prompts must not be among the prompts distill trains on."""
    distill = pf.recipe.stage("distill")
    if distill is None or getattr(distill, "prompts", None) is None or pf.teacher_kind != "pipeline":
        return
    prompts = cfg.prompts or zoo_evaluation_prompts(pf.recipe.teacher)
    if not prompts:
        return
    shared = set(prompts) & set(read_prompts(pf.file(distill.prompts)))
    if shared:
        raise InputError(f"{pf.where}: {len(shared)} evaluation prompt(s) are also distill prompts "
                         f"({distill.prompts}), e.g. {sorted(shared)[0]!r}: the student would be scored on what it "
                         "was trained on; keep the two sets apart")


def key_inputs(cfg: EvalStage, pf: Preflight) -> dict[str, str]:
    if cfg.clip_model is None:
        return {}
    source = _clip_source(cfg.clip_model, pf.recipe_dir)
    return {"clip_model": digest(hash_folder(source)) if isinstance(source, Path) else f"hub:{source}"}


def zoo_evaluation_prompts(spec_or_meta: str | dict) -> list[str] | None:
    """A zoo text-to-image teacher's evaluation prompts (trained and held-out combinations, alternating); None
    for any other teacher. Takes a teacher spec or the teacher stage's metadata (whose zoo card fixed them)."""
    if isinstance(spec_or_meta, str):
        if not spec_or_meta.startswith("zoo:"):
            return None
        from deploykit.zoo import get_entry

        try:
            entry = get_entry(spec_or_meta.removeprefix("zoo:"))
        except KeyError:
            return None
        dataset, sampling = entry.dataset, getattr(entry, "sampling", None)
        sampling = sampling.__dict__ if sampling is not None else None
    else:
        dataset, sampling = spec_or_meta.get("dataset"), spec_or_meta.get("zoo_card", {}).get("settings", {}).get("sampling")
    if dataset != "shapes" or sampling is None:
        return None
    from deploykit.zoo.shapes import evaluation_prompts

    return evaluation_prompts(sampling["prompts_per_split"], sampling["seed"])


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


def _pipeline_prompts(cfg: EvalStage, meta: dict) -> tuple[list[str], str]:
    """The prompts, one per image (cycled to num_samples), and where they came from."""
    if cfg.prompts is not None:
        prompts, source = cfg.prompts, "the recipe"
    elif (zoo := zoo_evaluation_prompts(meta)) is not None:
        prompts, source = zoo, f"{meta['source']}'s evaluation prompts"
    else:
        prompts, source = list(DEFAULT_PROMPTS), "deploykit's default prompts"
    return [prompts[i % len(prompts)] for i in range(cfg.num_samples)], source


def _pipeline_samples(ctx: StageContext, meta: dict, role: str, prompts: list[str]) -> torch.Tensor:
    from deploykit.eval.text_to_image import generate

    cfg = ctx.config
    model = load_model(_model_dir(ctx, role.removesuffix("-int8")))
    if role.endswith("-int8"):
        from deploykit.runtime.onnx_unet import with_onnx_forward

        model = with_onnx_forward(_int8_roles(ctx)[role], model)
    pipe = load_teacher_pipeline(ctx.inputs["teacher"], model)
    pipe.scheduler = make_pipeline_scheduler(cfg.scheduler, dict(pipe.scheduler.config))
    if role.startswith("student") and DECODER_ROLE in ctx.inputs:
        from deploykit.models.vae_decoder import use_decoder

        use_decoder(pipe.vae, ctx.inputs[DECODER_ROLE])
    with ctx.progress(f"generating with the {role}", len(prompts)) as advance:
        return generate(pipe, prompts, ctx.seed, cfg.steps, cfg.guidance_scale, meta["resolution"],
                        cfg.batch_size or PIPELINE_BATCH, advance)


def _prompt_judge(ctx: StageContext, prompts: list[str]):
    from deploykit.eval.attributes import CLASSIFIER_FILE, load_attribute_classifier
    from deploykit.eval.text_to_image import PromptJudge

    path = ctx.inputs["teacher"] / CLASSIFIER_FILE
    return PromptJudge(load_attribute_classifier(path), prompts) if path.is_file() else None


def _run_pipeline(ctx: StageContext, meta: dict) -> dict:
    from deploykit.eval import psnr_ssim, save_comparison_grid

    cfg = ctx.config
    roles = _roles(ctx) + list(_int8_roles(ctx))
    settings = {"num_samples": cfg.num_samples, "steps": cfg.steps, "scheduler": cfg.scheduler}
    if meta.get("random_weights"):
        ctx.console.print("  [yellow]random weights: quality is not measured[/]")
        atomic_write_json(ctx.out / "eval.json", {"quality": {r: {} for r in roles}, "skipped": "random weights",
                                                  **settings, "reference": {}})
        return {}
    prompts, source = _pipeline_prompts(cfg, meta)
    samples = {role: _pipeline_samples(ctx, meta, role, prompts) for role in roles}
    quality = {role: psnr_ssim(samples[role], samples["teacher"]) if role != "teacher" else {} for role in roles}
    reference: dict = {"compared_with": "the teacher's images from the same prompts and seeds", "prompts": list(dict.fromkeys(prompts)),
                       "prompt_source": source, "guidance_scale": cfg.guidance_scale}
    evaluation: dict = {"quality": quality, **settings, "reference": reference}
    judge = _prompt_judge(ctx, prompts)
    if judge is not None:
        breakdown = {}
        for role in roles:
            flat, breakdown[role] = judge.score(samples[role])
            quality[role].update(flat)
        reference.update(judge.baselines(samples["teacher"]))
        reference["fid_features"] = f"the zoo's attribute classifier, {judge.classifier.num_features}-d penultimate layer"
        card = meta.get("zoo_card", {})
        if "classifier_accuracy" in card:
            reference["classifier_held_out_accuracy"] = card["classifier_accuracy"]
        evaluation["prompt_accuracy"] = breakdown
    if cfg.clip_model is not None:
        from deploykit.eval.text_to_image import clip_score, load_clip

        clip = load_clip(_clip_source(cfg.clip_model, ctx.recipe_dir))
        for role in roles:
            quality[role]["clip_score"] = clip_score(samples[role], prompts, clip)
        reference["clip_model"] = cfg.clip_model
    n = min(cfg.grid_samples, cfg.num_samples)
    scale = 2 if meta["resolution"] <= 128 else 1
    save_comparison_grid(ctx.out / "samples.png", {r: samples[r][:n] for r in roles}, cols=4, scale=scale)
    atomic_write_json(ctx.out / "eval.json", evaluation)
    for role in roles:
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
        batch = cfg.batch_size or PIXEL_BATCH
        total = cfg.steps * ((cfg.num_samples + batch - 1) // batch)
        with ctx.progress(f"sampling {role}", total) as advance:
            samples[role] = sample_batched(backend, scheduler, noise, cfg.steps, batch, advance)

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
    out["eval"] = {k: evaluation[k] for k in ("num_samples", "steps", "scheduler", "reference", "skipped", "prompt_accuracy")
                   if k in evaluation}
    if "student-int8" in quality:  # what INT8 cost: the INT8 student against the fp32 one, on the same noise
        fp32, int8 = quality.get("student", {}), quality["student-int8"]
        out["int8"] = {"quality_loss": {m: (int8[m] - fp32[m]) * WORSE[m] for m in WORSE if m in fp32 and m in int8}}
    return out


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.1f}%"


def prompt_accuracy_rows(ev: dict) -> list[str]:
    """The per-attribute table of a zoo text-to-image teacher's prompt accuracy (and what its scale means)."""
    breakdown, ref = ev["prompt_accuracy"], ev["reference"]
    attributes = list(next(iter(breakdown.values()))["per_attribute"])
    lines = [f"Prompt accuracy: the share of asked attributes the zoo's attribute classifier reads back from each image, "
             f"one image per prompt and seed ({ev['num_samples']} images of {len(ref['prompts'])} prompts, "
             f"{ref['prompt_source']}); trained / held-out: attribute combinations the teacher was / was not trained on. Chance "
             f"{_pct(ref['chance'])}; the teacher's images read against shuffled prompts {_pct(ref['teacher_shuffled_prompts'])}."
             + (" Classifier accuracy on its own held-out renders: "
                + ", ".join(f"{k} {_pct(v)}" for k, v in ref["classifier_held_out_accuracy"].items()) + "."
                if "classifier_held_out_accuracy" in ref else ""),
             "", "| model | all | trained | held-out | " + " | ".join(attributes) + " | all five right |",
             "|---" * (len(attributes) + 5) + "|"]
    for role, b in breakdown.items():
        lines.append(f"| {role} | {_pct(b['accuracy'])} | {_pct(b.get('trained', {}).get('accuracy'))} | "
                     f"{_pct(b.get('held_out', {}).get('accuracy'))} | "
                     + " | ".join(_pct(b["per_attribute"][a]) for a in attributes) + f" | {_pct(b['all_attributes'])} |")
    lines += ["", f"FID on the classifier's features against {ref['fid_reference_images']} rendered images of the same "
              f"prompts; real renders the reference does not hold ({ref['fid_floor_images']}, one per image) score "
              f"{ref['fid_real_floor']:.3f}, the floor.", ""]
    return lines


def markdown_rows(report: dict) -> Markdown | None:
    if "eval" not in report:
        return None
    ev = report["eval"]
    if ev.get("skipped"):
        return Markdown(body=[f"Quality not measured: {ev['skipped']}."])
    if report.get("teacher_kind", "pixel") != "pixel":
        ref = ev.get("reference", {})
        lines = [f"Quality: {ev['num_samples']} images, {ev['steps']} {ev['scheduler']} steps at guidance "
                 f"{ref.get('guidance_scale', '?')}; PSNR / SSIM of each model's images against the teacher's from the same "
                 "prompts and seeds" + (f"; CLIP score with `{ref['clip_model']}`" if "clip_model" in ref else "") + "."]
        if "prompt_accuracy" in ev:
            lines += [""] + prompt_accuracy_rows(ev)
        return Markdown(body=lines, figures=["![samples](samples/teacher_vs_student.png)"])
    ref = ev.get("reference", {})
    line = (f"Quality: {ev['num_samples']} samples, {ev['steps']} {ev['scheduler'].upper()} steps, the same noise "
            "for every model. FID on the zoo classifier's features against the real data"
            + (f" (real images scored the same way: {ref['fid_real_subset']:.3f})" if "fid_real_subset" in ref else "")
            + "; PSNR / SSIM of each model's samples against the teacher's.")
    return Markdown(body=[line], figures=["![samples](samples/teacher_vs_student.png)"])


def publish(ctx: PublishContext) -> None:
    if (ctx.folder / "samples.png").is_file():
        shutil.copyfile(ctx.folder / "samples.png", ctx.into["samples"] / "teacher_vs_student.png")


EVAL = StageSpec(name="eval", version="4", config=EvalStage, reads=("teacher", "student"),
                 optional_reads=("student.pre_distill", "onnx_int8", DECODER_ROLE), writes={"eval": "."}, run=run,
                 depends_on=(*MODEL_PACKAGES, "onnxruntime", "torchmetrics", "scipy"), memory=memory,
                 preflight=preflight, key_inputs=key_inputs, report=report_section, markdown=markdown_rows,
                 publish=publish)
