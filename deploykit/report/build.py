"""Assemble the artifact's outputs from the stage folders: report.json / report.md, plots, model, onnx."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from deploykit.artifact import FILES_JSON, OUTPUT_DIRS
from deploykit.device.bundle import copy_folder
from deploykit.errors import QualityGateError
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
    prune = _read(roles.get("prune"), "prune.json")
    sparsity = _read(roles.get("sparsity"), "sparsify.json")
    distill = _read(roles.get("student"), "distill.json") if roles.get("student") != roles.get("pruned") else None
    export = _read(roles.get("onnx"), "export.json")
    bench = _read(roles.get("bench"), "bench.json")
    evaluation = _read(roles.get("eval"), "eval.json")
    quantize = _read(roles.get("onnx_int8"), "quantize.json")
    engines = _read(roles.get("engines"), "engines.json")
    verify = _read(roles.get("verify"), "verify.json")
    bundle = _read(roles.get("bundle"), "bundle.json")

    has_student = "student" in roles
    entries = ["teacher"] + (["pruned"] if has_student and distill else []) + (["student"] if has_student else [])
    report: dict = {"recipe": recipe.name, "target": recipe.target, "teacher_source": teacher.get("source"),
                    "teacher_kind": teacher.get("kind", "pixel"), "random_weights": bool(teacher.get("random_weights"))}
    if "resolution" in teacher:
        report["resolution"] = teacher["resolution"]
    batch = bench["shape"][0] if bench else 1
    for role in entries:
        model_role = "student" if role == "pruned" else role
        entry: dict = {}
        if prune:  # (without a prune stage the student has the teacher's shapes; bench counts both)
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
    if sparsity:
        report["sparsity"] = {k: sparsity[k] for k in ("method", "layers", "masked_weights", "zeroed_weights", "share_of_params")}
        if distill and "sparsity" in distill:
            report["sparsity"]["recovery"] = distill["sparsity"]
        checks = {role: v["sparsity"] for role, v in (export or {}).items() if "sparsity" in v}
        if checks:
            report["sparsity"]["onnx"] = {role: {k: c[k] for k in ("layers", "compliant", "passed")} for role, c in checks.items()}
        if bench and "semi_structured" in bench:
            report["sparsity"]["torch_cuda"] = {k: bench["semi_structured"][k] for k in ("backend", "dtype", "converted", "skipped")}
    if distill:
        last = distill["losses"][-min(50, len(distill["losses"])):]
        config = distill["config"]
        report["distill"] = {"steps": config["steps"], "final_loss": sum(r["loss"] for r in last) / len(last),
                             "weights": {k.removesuffix("_weight"): v for k, v in config.items()
                                         if k.endswith("_weight") and v},
                             "final_terms": {k: sum(r[k] for r in last if k in r) / max(1, sum(k in r for r in last))
                                             for k in dict.fromkeys(k for r in last for k in r) if k not in ("step", "loss")},
                             "ema_decay": config.get("ema_decay", 0.0), "processes": distill.get("processes", 1)}
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
    if bundle:
        report["bundle"] = {"target": bundle["target"], "files": len(bundle["files"]), "engine": bundle["engine"],
                            "components": {c: {"onnx": v["onnx"], "int8": v["int8"], "sparse": v["sparse"]}
                                           for c, v in bundle["components"].items()},
                            "serves": bundle["kind"] == "pixel" or bool(bundle.get("pipeline")),
                            "estimate": bundle.get("estimate")}
    if evaluation:
        report["eval"] = {k: evaluation[k] for k in ("num_samples", "steps", "scheduler", "reference", "skipped")
                          if k in evaluation}
    if quantize:
        _add_int8(report, recipe, quantize, bench, evaluation)
    return report


# the direction in which each metric gets worse: loss = (int8 - fp32) * sign
_WORSE = {"fid": 1.0, "psnr_vs_teacher": -1.0, "ssim_vs_teacher": -1.0}


def _add_int8(report: dict, recipe: Recipe, quantize: dict, bench: dict | None, evaluation: dict | None) -> None:
    """``teacher-int8`` / ``student-int8`` entries, ``speedup_int8`` (INT8 student over the fp32 dense teacher,
    same run) and ``int8`` (how it was quantized, what it cost in quality, the gate)."""
    stage = recipe.stage("quantize")
    quality = (evaluation or {}).get("quality", {})
    for role, q in quantize["models"].items():
        name = f"{role}-int8"
        entry: dict = {k: report[role][k] for k in ("params", "macs") if k in report.get(role, {})}
        if bench:
            entry["latency"] = {b: {**{k: v for k, v in rec["int8"][name].items() if not k.startswith("speedup")},
                                    "device": _device(bench, b)}
                                for b, rec in bench["backends"].items() if name in rec.get("int8", {})}
        entry["quality"] = quality.get(name, {})
        entry["error_vs_fp32"] = q["error_vs_fp32"]
        report[name] = entry
    info: dict = {"backend": quantize["backend"], "calibration": quantize["calibration"],
                  "models": {r: {k: v for k, v in q.items() if k in ("format", "per_channel", "calibration", "activations",
                                                                      "layers", "qdq", "error_vs_fp32", "exclude", "recipe")}
                             for r, q in quantize["models"].items()}}
    if bench:
        speedup = {}
        for b, rec in bench["backends"].items():
            if "student-int8" in rec.get("int8", {}):
                v = rec["int8"]["student-int8"]
                speedup[b] = v["speedup_vs_teacher"]
                info.setdefault("speedup", {})[b] = {
                    "student_int8_vs_teacher": v["speedup_vs_teacher"],
                    "student_int8_vs_teacher_pair_median": v["speedup_vs_teacher_pair_median"],
                    "student_int8_vs_student": rec["student"]["p50_ms"] / v["p50_ms"],
                    **({"teacher_int8_vs_teacher": rec["int8"]["teacher-int8"]["speedup_vs_teacher"]}
                       if "teacher-int8" in rec["int8"] else {})}
        if speedup:
            report["speedup_int8"] = speedup
    if "student-int8" in quality:
        fp32, int8 = quality.get("student", {}), quality["student-int8"]
        info["quality_loss"] = {m: (int8[m] - fp32[m]) * _WORSE[m] for m in _WORSE if m in fp32 and m in int8}
    limits = stage.max_quality_loss.limits() if stage and stage.max_quality_loss else {}
    if limits:
        info["max_quality_loss"] = limits
        info["gate"] = _gate(limits, info.get("quality_loss"), evaluation)
    report["int8"] = info


def _gate(limits: dict, loss: dict | None, evaluation: dict | None) -> dict:
    if evaluation is None:
        return {"status": "not checked", "reason": "no eval stage"}
    if evaluation.get("skipped"):
        return {"status": "not checked", "reason": evaluation["skipped"]}
    loss = loss or {}
    missing = [m for m in limits if m not in loss]
    if missing:
        return {"status": "failed", "reason": f"{', '.join(missing)} not measured for the INT8 student "
                                              "(FID needs a teacher with a known data set)"}
    over = {m: loss[m] for m, limit in limits.items() if loss[m] > limit}
    if over:
        worst = ", ".join(f"{m} lost {loss[m]:.3g} (at most {limits[m]:g} accepted)" for m in over)
        return {"status": "failed", "reason": f"INT8 student vs fp32 student: {worst}"}
    return {"status": "passed", "reason": ", ".join(f"{m} lost {loss[m]:.3g} <= {limits[m]:g}" for m in limits)}


def check_quality_gate(report: dict) -> str | None:
    """Raise :class:`QualityGateError` when the recipe's ``quantize.max_quality_loss`` is exceeded; otherwise a
    line saying how the gate went (None when there is no gate)."""
    gate = report.get("int8", {}).get("gate")
    if gate is None:
        return None
    if gate["status"] == "failed":
        raise QualityGateError(f"{gate['reason']} (quantize.max_quality_loss in recipe {report['recipe']}); "
                               "nothing was written: relax the limit, exclude more layers, or change the calibration")
    return f"INT8 quality gate {gate['status']}: {gate['reason']}"


def _int8_folder(roles: dict[str, Path], dest: Path) -> None:
    """The INT8 student in the layout of ``onnx/``: for SD the student's fp32 pipeline with the INT8 UNet in place."""
    int8 = roles["onnx_int8"] / "student" / "unet"
    if not int8.is_dir():
        return
    pipeline = roles["onnx"] / "student"
    if any(p.name != "unet" for p in pipeline.iterdir()):
        shutil.copytree(pipeline, dest, dirs_exist_ok=True, ignore=lambda d, names: names if Path(d).name == "unet" else [])
    shutil.copytree(int8, dest / "unet", dirs_exist_ok=True)
    config = pipeline / "unet" / "config.json"
    if config.is_file():
        shutil.copyfile(config, dest / "unet" / "config.json")


def write_outputs(root: Path, recipe: Recipe, roles: dict[str, Path], report: dict | None = None) -> dict:
    """Write every top-level output; each folder is built aside and swapped in whole."""
    root = Path(root)
    report = assemble(recipe, roles) if report is None else report
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
        if "onnx_int8" in roles:
            _int8_folder(roles, staged["onnx_int8"])
        if "engines" in roles and (roles["engines"] / "student").is_dir():
            shutil.copytree(roles["engines"] / "student", staged["engines"], dirs_exist_ok=True)
        if "bundle" in roles:
            copy_folder(roles["bundle"], staged["bundle"], skip=(FILES_JSON,))
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
