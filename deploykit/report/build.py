"""Assemble the artifact's outputs from the stage folders: report.json / report.md, plots, model, onnx."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from deploykit.artifact import OUTPUT_DIRS
from deploykit.io import atomic_write_json, atomic_write_text, make_temp_dir, replace_dir
from deploykit.recipe import Recipe
from deploykit.report.markdown import render
from deploykit.report.plots import latency_bars, loss_curve


def _read(folder: Path | None, name: str) -> dict | None:
    if folder is None or not (folder / name).is_file():
        return None
    return json.loads((folder / name).read_text())


def _device(bench: dict, backend: str) -> str:
    return bench["device"].get("gpu", "cuda") if backend.endswith("cuda") else bench["device"]["cpu"]


def assemble(recipe: Recipe, roles: dict[str, Path]) -> dict:
    teacher = _read(roles["teacher"], "teacher.json") or {}
    prune = _read(roles.get("pruned"), "prune.json")
    distill = _read(roles.get("student"), "distill.json") if roles.get("student") != roles.get("pruned") else None
    export = _read(roles.get("onnx"), "export.json")
    bench = _read(roles.get("bench"), "bench.json")
    evaluation = _read(roles.get("eval"), "eval.json")
    engines = _read(roles.get("engines"), "engines.json")
    verify = _read(roles.get("verify"), "verify.json")

    entries = ["teacher"] + (["pruned"] if prune and distill else []) + (["student"] if prune else [])
    report: dict = {"recipe": recipe.name, "target": recipe.target, "teacher_source": teacher.get("source"),
                    "teacher_kind": teacher.get("kind", "pixel"), "random_weights": bool(teacher.get("random_weights"))}
    if "resolution" in teacher:
        report["resolution"] = teacher["resolution"]
    batch = bench["shape"][0] if bench else 1
    for role in entries:
        model_role = "student" if role == "pruned" else role
        entry: dict = {}
        if prune:
            key = "teacher" if role == "teacher" else "student"
            entry["params"] = prune[f"params_{key}"]
            entry["macs_per_sample"] = prune[f"macs_per_sample_{key}"]
            entry["macs"] = entry["macs_per_sample"] * batch
        if bench:
            entry["params"] = bench["models"][model_role]["params"]
            entry["macs"] = bench["models"][model_role]["macs"]
            if role != "pruned":  # the pruned model has the student's graph; it is timed once, as the student
                entry["latency"] = {b: {**v[role], "device": _device(bench, b)} for b, v in bench["backends"].items()}
        entry["quality"] = (evaluation or {}).get("quality", {}).get(role, {})
        report[role] = entry
    if prune:
        report["macs_ratio"] = prune["macs_ratio"]
        report["params_ratio"] = prune["params_student"] / prune["params_teacher"]
        report["prune"] = {k: prune[k] for k in ("criterion", "macs_target", "pruning_ratio")}
    if bench:
        report["speedup"] = {b: v["speedup"] for b, v in bench["backends"].items()}
        report["speedup_pair_median"] = {b: v["speedup_pair_median"] for b, v in bench["backends"].items()}
        report["bench"] = {k: bench[k] for k in ("shape", "precision", "device")}
        report["macs_note"] = f"per UNet call at batch {batch}, {'x'.join(map(str, bench['shape'][1:]))}"
        if "end_to_end" in bench:
            e2e = bench["end_to_end"]
            report["end_to_end"] = {
                **{k: e2e[k] for k in ("steps", "guidance_scale", "prompt")},
                "backends": {b: {"teacher_p50_ms": v["teacher"]["p50_ms"], "student_p50_ms": v["student"]["p50_ms"],
                                 "speedup": v["speedup"], "runs": v["teacher"]["runs"]} for b, v in e2e["backends"].items()}}
    if distill:
        last = distill["losses"][-min(50, len(distill["losses"])):]
        report["distill"] = {"steps": distill["config"]["steps"],
                             "final_loss": sum(r["loss"] for r in last) / len(last)}
    if export:
        report["export"] = {role: v["check"] for role, v in export.items()}
    if engines:
        report["engines"] = {role: {k: v[k] for k in ("path", "precision", "gpu", "tensorrt", "flags", "seconds", "profiles")}
                             | {"sparse_layers": {"eligible": len(v["sparse"].get("eligible", [])),
                                                  "picked": len(v["sparse"].get("picked", [])),
                                                  "lines": v["sparse"].get("lines", [])}}
                             for role, v in engines.items()}
    if verify:
        report["verify"] = {"checks": {f"{role}/{name}": {k: c.get(k) for k in ("passed", "precision", "max_abs_error",
                                                                                 "max_rel_error", "worst_output", "atol",
                                                                                 "rtol", "message")}
                                       for role, checks in verify["roles"].items() for name, c in checks.items()},
                            "skipped": verify["skipped"]}
    if bench and "estimate" in bench:
        report["estimate"] = bench["estimate"]
    if evaluation:
        report["eval"] = {k: evaluation[k] for k in ("num_samples", "steps", "scheduler", "reference", "skipped")
                          if k in evaluation}
    return report


def write_outputs(root: Path, recipe: Recipe, roles: dict[str, Path]) -> dict:
    """Write every top-level output; each folder is built aside and swapped in whole."""
    root = Path(root)
    report = assemble(recipe, roles)
    staged: dict[str, Path] = {}
    try:
        for name in OUTPUT_DIRS:
            staged[name] = make_temp_dir(root, f".{name}.")
        final_model = roles.get("student", roles["teacher"]) / "model"
        shutil.copytree(final_model, staged["model"], dirs_exist_ok=True)
        atomic_write_json(staged["model"] / "scheduler_config.json",
                          json.loads((roles["teacher"] / "teacher.json").read_text())["scheduler_config"])
        if "onnx" in roles:
            # the student in the recipe's export precision: fp16 when it was asked for
            fp16 = roles["onnx"] / "student-fp16"
            shutil.copytree(fp16 if fp16.is_dir() else roles["onnx"] / "student", staged["onnx"], dirs_exist_ok=True)
        if "engines" in roles and (roles["engines"] / "student").is_dir():
            shutil.copytree(roles["engines"] / "student", staged["engines"], dirs_exist_ok=True)
        if (bench := _read(roles.get("bench"), "bench.json")) is not None:
            latency_bars(staged["plots"] / "latency.png", bench)
        if (distill := _read(roles.get("student"), "distill.json")) is not None:
            loss_curve(staged["plots"] / "distill_loss.png", distill["losses"])
        if "eval" in roles and (roles["eval"] / "samples.png").is_file():
            shutil.copyfile(roles["eval"] / "samples.png", staged["samples"] / "teacher_vs_student.png")
        for name, tmp in staged.items():
            if any(tmp.iterdir()):
                replace_dir(tmp, root / name)
            else:
                shutil.rmtree(tmp)
                if (root / name).exists():
                    shutil.rmtree(root / name)
    finally:
        for tmp in staged.values():
            shutil.rmtree(tmp, ignore_errors=True)
    atomic_write_json(root / "report.json", report)
    atomic_write_text(root / "report.md", render(report))
    return report
