"""Text-to-image on a CPU, measured: zoo:shapes through the flagship recipe, one compression step at a time.

    python benchmarks/t2i_cpu.py [--seeds 0 1 2] [--work DIR] [--out benchmarks/results]

Builds recipes/shapes_jetson_nano.yaml (prune -> 2:4 -> DaKD -> tiny decoder -> export -> INT8 -> bundle ->
bench -> eval) once per seed, timing each whole build, and two ablations of it with seed 0 (prune and
recover, without 2:4: denoising-only recovery, and the recipe's full DaKD). Then every model is scored the
same way here, from the same prompts and noise (the zoo's 240 evaluation prompts, one image each):

    teacher / pruned / + denoising-only recovery / + full DaKD / + 2:4 / + INT8 / + tiny decoder

each with its UNet's MACs ratio, its ONNX Runtime p50 and speedup over the teacher (all UNets round-robin
in one run, batch 2: classifier-free guidance), prompt accuracy (overall, trained and held-out attribute
combinations), FID on the attribute classifier's features (with the real-image floor) and PSNR / SSIM
against the teacher's images. The last row, what the recipe ships, is scored for every seed: mean and
spread. End to end per image (text encoder + 20 guided steps + VAE decode) on ONNX Runtime, dense pipeline
against the student pipelines, in one run. A grid of the same prompts, teacher beside the shipped student.

Writes t2i_cpu.json, t2i_cpu.md and t2i_cpu_grid.png into --out. Builds are cached in --work (a second run
reuses them). Every figure says what load the machine was under while it was taken.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch
import yaml
from rich.console import Console

from deploykit.artifact import package_versions
from deploykit.bench import measure_group_against
from deploykit.bench.machine import command_line, device_info
from deploykit.recipe import load_recipe
from deploykit.runner import build

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
FLAGSHIP = REPO / "recipes" / "shapes_jetson_nano.yaml"
console = Console(stderr=True)


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# ---- builds ----------------------------------------------------------------------------------------------

def _ablation(work: Path, name: str, distill_update: dict) -> Path:
    """The flagship recipe cut to prune -> distill -> export (no 2:4), with distill changed by ``distill_update``."""
    recipe = yaml.safe_load(FLAGSHIP.read_text())
    stages = {s["stage"]: s for s in recipe["stages"]}
    distill = {**stages["distill"], **distill_update, "prompts": str(REPO / "recipes" / stages["distill"]["prompts"])}
    distill.pop("mask_mode", None)
    recipe.update(name=f"shapes-{name}", target="cpu", stages=[stages["prune"], distill, stages["export"]])
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def ablations(work: Path, overrides: tuple[str, ...]) -> dict:
    """Prune and recover without 2:4: denoising loss only (Diff-Pruning's recovery), and the recipe's full DaKD."""
    denoise_only = {"denoise_weight": 1.0, "output_kd_weight": 0.0, "feature_kd_weight": 0.0, "attention_kd_weight": 0.0,
                    "distribution_kd_weight": 0.0, "adversarial_weight": 0.0}
    return {"denoise": run_build(_ablation(work, "denoise", denoise_only), work / "denoise", overrides),
            "dakd": run_build(_ablation(work, "dakd", {}), work / "dakd", overrides)}


def run_build(recipe: Path, out: Path, overrides: tuple[str, ...] = ()) -> dict:
    """Build (or take from --work's cache) and say how long it took and under what load. Overrides of stages the
    recipe does not have are left out (the ablations have fewer stages than the flagship)."""
    listed = {s["stage"] for s in yaml.safe_load(recipe.read_text())["stages"]}
    from deploykit.stages import STAGES

    overrides = tuple(o for o in overrides if o.split(".")[0] not in STAGES or o.split(".")[0] in listed)
    before, started = load(), time.perf_counter()
    # the ablation recipes live in --work and read the flagship's prompt file from recipes/
    recipe_obj = load_recipe(recipe, allowed=[REPO / "recipes"], overrides=overrides)
    report = build(recipe_obj, recipe, out, console, overrides=overrides)
    seconds = time.perf_counter() - started
    return {"out": str(out), "seconds": round(seconds, 1), "load_before": before, "load_after": load(),
            "report": report}


# ---- models, as the rows score them ----------------------------------------------------------------------

def _stage(out: Path, name: str) -> Path:
    return next(out.glob(f"stages/*-{name}-*"))


def pipeline_for(out: Path, unet_dir: Path, int8_onnx: Path | None = None, tiny_decoder: Path | None = None):
    from deploykit.models import load_model
    from deploykit.models.vae_decoder import use_decoder
    from deploykit.runtime import make_pipeline_scheduler
    from deploykit.runtime.onnx_unet import with_onnx_forward
    from deploykit.stages.data import load_teacher_pipeline

    model = load_model(unet_dir)
    if int8_onnx is not None:
        model = with_onnx_forward(int8_onnx, model)
    pipe = load_teacher_pipeline(_stage(out, "teacher"), model)
    pipe.scheduler = make_pipeline_scheduler("ddim", dict(pipe.scheduler.config))
    if tiny_decoder is not None:
        use_decoder(pipe.vae, tiny_decoder)
    return pipe


def rows_of(builds: dict) -> list[dict]:
    """(name, how to build its pipeline, its UNet's ONNX graph for the timing run) per row, seed 0."""
    flag, den, dakd = (Path(builds[k]["out"]) for k in ("flagship-0", "denoise", "dakd"))
    int8 = flag / "onnx_int8" / "unet" / "model.onnx"
    return [
        {"name": "teacher", "pipe": lambda: pipeline_for(den, _stage(den, "teacher") / "model"),
         "onnx": _stage(den, "export") / "teacher" / "unet" / "model.onnx"},
        {"name": "pruned", "pipe": lambda: pipeline_for(den, _stage(den, "prune") / "model"),
         "onnx": None, "note": "before recovery; the students' graph"},
        {"name": "+ denoising-only recovery", "pipe": lambda: pipeline_for(den, den / "model"),
         "onnx": den / "onnx" / "unet" / "model.onnx"},
        {"name": "+ full DaKD", "pipe": lambda: pipeline_for(dakd, dakd / "model"),
         "onnx": dakd / "onnx" / "unet" / "model.onnx"},
        {"name": "+ 2:4", "pipe": lambda: pipeline_for(flag, flag / "model"), "onnx": flag / "onnx" / "unet" / "model.onnx"},
        {"name": "+ INT8", "pipe": lambda: pipeline_for(flag, flag / "model", int8), "onnx": int8},
        {"name": "+ tiny decoder", "pipe": lambda: pipeline_for(flag, flag / "model", int8, flag / "model" / "vae_decoder"),
         "onnx": int8, "note": "what the recipe ships"},
    ]


# ---- quality -----------------------------------------------------------------------------------------------

def score_rows(rows: list[dict], builds: dict, seeds: list[int], eval_cfg: dict, grid_path: Path) -> tuple[dict, dict]:
    from deploykit.eval import psnr_ssim
    from deploykit.eval.attributes import CLASSIFIER_FILE, load_attribute_classifier
    from deploykit.eval.text_to_image import PromptJudge, generate
    from deploykit.stages.eval import zoo_evaluation_prompts

    flag0 = Path(builds["flagship-0"]["out"])
    teacher_dir = _stage(flag0, "teacher")
    prompts = zoo_evaluation_prompts(json.loads((teacher_dir / "teacher.json").read_text()))
    prompts = [prompts[i % len(prompts)] for i in range(eval_cfg["num_samples"])]
    judge = PromptJudge(load_attribute_classifier(teacher_dir / CLASSIFIER_FILE), prompts)
    side = json.loads((teacher_dir / "teacher.json").read_text())["resolution"]

    def images_of(pipe) -> torch.Tensor:
        return generate(pipe, prompts, 0, eval_cfg["steps"], 7.5, side, eval_cfg["batch_size"])

    scores, samples = {}, {}
    for row in rows:
        console.print(f"scoring {row['name']}")
        samples[row["name"]] = images_of(row["pipe"]())
    teacher = samples["teacher"]
    for name, images in samples.items():
        flat, detail = judge.score(images)
        scores[name] = {**flat, "per_attribute": detail["per_attribute"], "all_attributes": detail["all_attributes"],
                        **(psnr_ssim(images, teacher) if name != "teacher" else {})}
    final = rows[-1]["name"]
    per_seed = {0: scores[final]}
    for seed in seeds:
        if seed == 0:
            continue
        out = Path(builds[f"flagship-{seed}"]["out"])
        console.print(f"scoring {final}, seed {seed}")
        pipe = pipeline_for(out, out / "model", out / "onnx_int8" / "unet" / "model.onnx", out / "model" / "vae_decoder")
        images = images_of(pipe)
        flat, detail = judge.score(images)
        per_seed[seed] = {**flat, **psnr_ssim(images, teacher)}
    reference = {**judge.baselines(teacher), "prompts": len(set(prompts)), "images": len(prompts),
                 "steps": eval_cfg["steps"], "scheduler": "ddim", "guidance_scale": 7.5, "image_seed": 0}
    grid(samples["teacher"], samples[final], prompts, grid_path)
    return {"rows": scores, "final_per_seed": per_seed, "reference": reference}, samples


GRID_PROMPTS = 16


def grid(teacher: torch.Tensor, student: torch.Tensor, prompts: list[str], path: Path) -> None:
    """The first prompts (trained and held-out combinations alternate), teacher beside student, prompt beside them."""
    from PIL import Image, ImageDraw

    from deploykit.eval.fidelity import to_unit

    def pil(x: torch.Tensor) -> Image.Image:
        arr = (to_unit(x) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        return Image.fromarray(arr).resize((128, 128), Image.NEAREST)

    from deploykit.zoo.shapes import parse_prompt

    rows, cell, text_w, header = GRID_PROMPTS // 2, 128, 250, 22
    width = 2 * (2 * cell + text_w + 24)
    canvas = Image.new("RGB", (width, header + rows * (cell + 6)), "white")
    draw = ImageDraw.Draw(canvas)
    for col in range(2):
        x0 = col * (2 * cell + text_w + 24)
        draw.text((x0 + 4, 4), "teacher", fill="black")
        draw.text((x0 + cell + 8, 4), "student (shipped)", fill="black")
        for r in range(rows):
            i = col * rows + r
            y = header + r * (cell + 6)
            canvas.paste(pil(teacher[i]), (x0, y))
            canvas.paste(pil(student[i]), (x0 + cell + 4, y))
            held = " (held-out pair)" if parse_prompt(prompts[i]).held_out else ""
            draw.text((x0 + 2 * cell + 12, y + cell // 2 - 12), prompts[i] + "\n" + held.strip(), fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)


# ---- latency -------------------------------------------------------------------------------------------------

def unet_latency(rows: list[dict], builds: dict, runs: int) -> dict:
    """Every row's UNet graph round-robin in one run on ONNX Runtime, batch 2 (classifier-free guidance)."""
    from deploykit.models import count_macs, load_model
    from deploykit.models.inputs import example_unet_inputs
    from deploykit.runtime import OnnxRuntimeBackend

    flag0 = Path(builds["flagship-0"]["out"])
    teacher = load_model(_stage(flag0, "teacher") / "model")
    student = load_model(flag0 / "model")
    inputs = example_unet_inputs(teacher, 2, size=16, seed=0)
    macs = {"teacher": count_macs(teacher, inputs), "student": count_macs(student, inputs)}
    graphs = {row["name"]: row["onnx"] for row in rows if row["onnx"] is not None}
    distinct = dict.fromkeys(graphs.values())
    backends = {path: OnnxRuntimeBackend(path) for path in distinct}
    calls = {name: (lambda b=backends[path]: b(*inputs)) for name, path in graphs.items()
             if name == "teacher" or path != graphs["teacher"]}
    calls = {name: call for name, call in calls.items() if name != "+ tiny decoder"}  # the + INT8 graph again
    before = load()
    latency, ratios = measure_group_against(calls, "teacher", warmup=5, runs=runs)
    return {"batch": 2, "shape": list(inputs[0].shape), "runs": runs, "load_before": before, "load_after": load(),
            "macs": macs, "p50_ms": {k: v.p50_ms for k, v in latency.items()},
            "p90_ms": {k: v.p90_ms for k, v in latency.items()},
            "speedup": {k: latency["teacher"].p50_ms / v.p50_ms for k, v in latency.items()},
            "speedup_pair_median": ratios}


def end_to_end(builds: dict, steps: int, runs: int, work: Path) -> dict:
    """Whole generations on ONNX Runtime (optimum's pipelines over the artifact's ONNX folders), one run."""
    import warnings

    from optimum.onnxruntime import ORTStableDiffusionPipeline

    flag0 = Path(builds["flagship-0"]["out"])
    # the INT8 student with the teacher's decoder: the shipped INT8 folder with the teacher's vae_decoder graph
    int8_dense_decoder = work / "int8-teacher-decoder"
    if not int8_dense_decoder.is_dir():
        shutil.copytree(flag0 / "onnx_int8", int8_dense_decoder)
        shutil.rmtree(int8_dense_decoder / "vae_decoder")
        shutil.copytree(_stage(flag0, "export") / "teacher" / "vae_decoder", int8_dense_decoder / "vae_decoder")
    folders = {"dense pipeline (teacher)": _stage(flag0, "export") / "teacher",
               "student fp32 (2:4 weights run densely) + tiny decoder": flag0 / "onnx",
               "student INT8, teacher's decoder": int8_dense_decoder,
               "student INT8 + tiny decoder (shipped)": flag0 / "onnx_int8"}
    pipes = {k: ORTStableDiffusionPipeline.from_pretrained(v, provider="CPUExecutionProvider") for k, v in folders.items()}
    prompt = "two small red squares at the top left"

    def call(pipe):
        def go():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                pipe(prompt, num_inference_steps=steps, guidance_scale=7.5, height=64, width=64, output_type="np",
                     generator=torch.Generator().manual_seed(0))
        return go

    for p in pipes.values():
        p.set_progress_bar_config(disable=True)
    before = load()
    latency, ratios = measure_group_against({k: call(p) for k, p in pipes.items()}, "dense pipeline (teacher)",
                                            warmup=1, runs=runs)
    dense = latency["dense pipeline (teacher)"].p50_ms
    return {"steps": steps, "guidance_scale": 7.5, "prompt": prompt, "runs": runs, "load_before": before,
            "load_after": load(), "p50_ms": {k: v.p50_ms for k, v in latency.items()},
            "speedup": {k: dense / v.p50_ms for k, v in latency.items()}, "speedup_pair_median": ratios}


# ---- the page --------------------------------------------------------------------------------------------------

def _pct(v: float) -> str:
    return f"{100 * v:.1f}%"


def _num(v: float | None, digits: int) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def markdown(result: dict) -> str:
    q, lat, e2e = result["quality"], result["unet_latency"], result["end_to_end"]
    ref = q["reference"]
    m = result["machine"]
    lines = [
        "# t2i_cpu: zoo:shapes through the flagship recipe, one step at a time", "",
        f"`{result['command']}` on {m['cpu']}, {m['threads']} threads, {m['platform']}; torch {result['packages']['torch']}, "
        f"onnxruntime {result['packages']['onnxruntime']}, diffusers {result['packages']['diffusers']}. The CPU was shared "
        "with other work: load averages (1 min) are given beside each measurement.", "",
        f"Quality: {ref['images']} images, one per zoo evaluation prompt ({ref['prompts']} prompts: trained and held-out "
        f"attribute combinations alternate), {ref['steps']} DDIM steps at guidance {ref['guidance_scale']}, the same noise "
        f"for every model. Prompt accuracy: chance {_pct(ref['chance'])}; the teacher's images read against shuffled "
        f"prompts {_pct(ref['teacher_shuffled_prompts'])}. FID on the attribute classifier's features; real renders score "
        f"{ref['fid_real_floor']:.2f} (the floor). UNet latency: ONNX Runtime, batch {lat['batch']} (classifier-free "
        f"guidance), every graph round-robin in one run of {lat['runs']} rounds (load {lat['load_before'][0]} -> "
        f"{lat['load_after'][0]}).", "",
        "| model | MACs ratio | ORT p50 ms | speedup | prompt acc. | trained | held-out | FID | PSNR dB | SSIM |",
        "|---|---|---|---|---|---|---|---|---|---|"]
    macs_ratio = lat["macs"]["student"] / lat["macs"]["teacher"]
    timed_as = {"pruned": "+ denoising-only recovery", "+ tiny decoder": "+ INT8"}
    for row in result["rows"]:
        name = row["name"]
        s = q["rows"][name]
        t = timed_as.get(name, name)
        p50, sp = lat["p50_ms"].get(t), lat["speedup"].get(t)
        lines.append(f"| {name} | {1.0 if name == 'teacher' else macs_ratio:.3f} | {p50:.2f} | {sp:.2f}x | "
                     f"{_pct(s['prompt_accuracy'])} | {_pct(s['prompt_accuracy_trained'])} | {_pct(s['prompt_accuracy_held_out'])} | "
                     f"{s['fid']:.2f} | {_num(s.get('psnr_vs_teacher'), 2)} | {_num(s.get('ssim_vs_teacher'), 3)} |")
    final = result["final"]
    lines += ["", f"The last row over {len(final['seeds'])} build seeds ({', '.join(map(str, final['seeds']))}; the images "
              "use the same noise every time): mean ± standard deviation.", "",
              "| metric | " + " | ".join(f"seed {s}" for s in final["seeds"]) + " | mean ± sd |",
              "|---" * (len(final["seeds"]) + 2) + "|"]
    for metric, fmt in (("prompt_accuracy", _pct), ("prompt_accuracy_trained", _pct), ("prompt_accuracy_held_out", _pct),
                        ("fid", lambda v: f"{v:.2f}"), ("psnr_vs_teacher", lambda v: f"{v:.2f}")):
        vals = [final["per_seed"][str(s)][metric] for s in final["seeds"]]
        mean, sd = statistics.mean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0
        spread = f"{100 * mean:.1f} ± {100 * sd:.1f}%" if fmt is _pct else f"{mean:.2f} ± {sd:.2f}"
        lines.append(f"| {metric} | " + " | ".join(fmt(v) for v in vals) + f" | {spread} |")
    lines += ["", f"End to end per image on ONNX Runtime (text encoder + {e2e['steps']} UNet steps at guidance "
              f"{e2e['guidance_scale']} + VAE decode, 64x64; optimum's pipeline over each ONNX folder; one run of "
              f"{e2e['runs']} rounds, load {e2e['load_before'][0]} -> {e2e['load_after'][0]}):", "",
              "| pipeline | p50 ms | speedup | median of per-round ratios |", "|---|---|---|---|"]
    lines += [f"| {k} | {v:.1f} | {e2e['speedup'][k]:.2f}x | {e2e['speedup_pair_median'][k]:.2f}x |"
              for k, v in e2e["p50_ms"].items()]
    lines += ["", "Whole flagship builds (`deploykit build recipes/shapes_jetson_nano.yaml --set seed=N`):", "",
              "| seed | minutes | load before -> after |", "|---|---|---|"]
    lines += [f"| {s} | {b['seconds'] / 60:.1f} | {b['load_before'][0]} -> {b['load_after'][0]} |" if b["seconds"] >= 5
              else f"| {s} | (taken from --work's stage cache: built by an earlier run) | |"
              for s, b in ((s, result["builds"][f"flagship-{s}"]) for s in final["seeds"])]
    lines += ["", "![teacher beside the shipped student](t2i_cpu_grid.png)", ""]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--work", type=Path, default=REPO / "artifacts" / "t2i-bench")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--runs", type=int, default=60, help="UNet timing rounds")
    parser.add_argument("--e2e-runs", type=int, default=8, help="end-to-end timing rounds")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="recipe settings for every build, as `deploykit build --set` (a quick check of this script "
                             "on zoo:shapes-tiny; the committed results use none)")
    args = parser.parse_args()
    if 0 not in args.seeds:
        parser.error("--seeds must include 0 (the ablations and every row but the last use seed 0)")
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    flagship = load_recipe(FLAGSHIP, overrides=tuple(args.set))
    builds = {}
    # seed 0 and the ablations first: with --seeds 0 alone the table is whole, and a later run with more seeds
    # takes these from --work's stage cache
    for seed in sorted(args.seeds):
        console.print(f"[bold]flagship, seed {seed}[/]")
        builds[f"flagship-{seed}"] = run_build(FLAGSHIP, work / f"flagship-{seed}", (*args.set, f"seed={seed}"))
        if seed == 0:
            builds.update(ablations(work, tuple(args.set)))
    rows = rows_of(builds)
    quality, _ = score_rows(rows, builds, args.seeds, flagship.stage("eval").model_dump(), args.out / "t2i_cpu_grid.png")
    unet = unet_latency(rows, builds, args.runs)
    e2e = end_to_end(builds, flagship.stage("bench").end_to_end.steps, args.e2e_runs, work)
    versions = package_versions()
    result = {
        "command": command_line("benchmarks/t2i_cpu.py"),
        "machine": {"platform": platform.platform(), "python": sys.version.split()[0], **device_info()},
        "packages": {k: versions.get(k) for k in ("torch", "onnxruntime", "diffusers", "torch-pruning", "optimum-onnx")},
        "rows": [{k: v for k, v in row.items() if k in ("name", "note")} for row in rows],
        "quality": quality,
        "final": {"seeds": args.seeds, "per_seed": {str(k): v for k, v in quality["final_per_seed"].items()}},
        "unet_latency": unet,
        "end_to_end": e2e,
        "builds": {k: {kk: vv for kk, vv in v.items() if kk != "report"} | {"report": v["report"]} for k, v in builds.items()},
        "teacher_card": json.loads((_stage(Path(builds["flagship-0"]["out"]), "teacher") / "teacher.json").read_text())
                        .get("zoo_card", {}).get("teacher_prompt_accuracy"),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "t2i_cpu.json").write_text(json.dumps(result, indent=2, default=float) + "\n")
    (args.out / "t2i_cpu.md").write_text(markdown(result))
    console.print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
