"""report.md: the figures of report.json as a page people read."""

from __future__ import annotations

from deploykit.report.remote import markdown as remote_markdown


def _fmt(v, digits: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _si(n: float | None) -> str:
    if n is None:
        return "–"
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def render(report: dict) -> str:
    roles = [r for r in ("teacher", "pruned", "student", "teacher-int8", "student-int8") if r in report]
    backends = list(report.get("speedup", {}))
    metrics = sorted({m for r in roles for m in report[r].get("quality", {})})
    lines = [f"# deploykit report: {report['recipe']}", ""]
    lines.append(f"Teacher `{report.get('teacher_source')}`, target `{report['target']}`.")
    if report.get("random_weights"):
        lines.append("**Random weights: these figures measure speed, never quality.**")
    if "bench" in report:
        b = report["bench"]
        where = f"{b['device']['cpu']}, {b['device']['threads']} threads" + (f"; {b['device']['gpu']}" if "gpu" in b["device"] else "")
        lines.append(f"Latency: {b['precision']}, UNet input {'x'.join(map(str, b['shape']))}"
                     + (f" ({report['resolution']}x{report['resolution']} images)" if "resolution" in report else "")
                     + f", {where}; teacher and student interleaved in one run. MACs {report.get('macs_note', '')}.")
    lines.append("")
    header = ["model", "params", "MACs"] + [f"{b} p50 ms" for b in backends] + metrics
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for role in roles:
        e = report[role]
        row = [role, _si(e.get("params")), _si(e.get("macs"))]
        row += [_fmt(e.get("latency", {}).get(b, {}).get("p50_ms"), 1) for b in backends]
        row += [_fmt(e.get("quality", {}).get(m)) for m in metrics]
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    if "pruned" in roles:
        lines.append("`pruned` is the student before recovery; it has the student's graph, so it is timed once, as the student.")
        lines.append("")
    if backends:
        lines.append("| backend | speedup (teacher p50 / student p50) | median of per-pair ratios |")
        lines.append("|---|---|---|")
        for b in backends:
            lines.append(f"| {b} | **{report['speedup'][b]:.2f}x** | {report['speedup_pair_median'][b]:.2f}x |")
        lines.append("")
    lines += remote_markdown(report)
    if "int8" in report:
        lines += _int8_lines(report)
    if "end_to_end" in report:
        e = report["end_to_end"]
        lines += [f"End to end (text encoding, {e['steps']} steps at guidance {e['guidance_scale']}, VAE decode; one image):", "",
                  "| backend | teacher p50 s | student p50 s | speedup |", "|---|---|---|---|"]
        for b, v in e["backends"].items():
            lines.append(f"| {b} | {v['teacher_p50_ms'] / 1e3:.2f} | {v['student_p50_ms'] / 1e3:.2f} | **{v['speedup']:.2f}x** |")
        lines.append("")
    if report.get("estimate"):
        lines += ["Roofline estimate beside measurement (deploykit.bench.roofline; sum over ops of max(FLOPs / peak, "
                  "bytes / bandwidth)):", "",
                  "| backend | model | estimate ms | measured p50 ms | measured / estimate | peaks |", "|---|---|---|---|---|---|"]
        for b, e in report["estimate"].items():
            if "skipped" in e:
                lines.append(f"| {b} | – | – | – | – | skipped: {e['skipped']} |")
                continue
            d = e["device"]
            peaks = f"{d['name']}: {max(d['matrix'].values()) / 1e9:.0f} GFLOP/s, {d['bandwidth'] / 1e9:.1f} GB/s"
            for role in ("teacher", "student"):
                r = e[role]
                lines.append(f"| {b} | {role} | {r['ms']:.2f} | {r['measured_p50_ms']:.2f} | "
                             f"{r['measured_over_estimate']:.2f}x | {peaks} |")
        lines.append("")
    if "macs_ratio" in report:
        lines.append(f"MACs ratio (student / teacher): {report['macs_ratio']:.3f}; params ratio {report['params_ratio']:.3f}; "
                     f"criterion `{report['prune']['criterion']}`, pruning ratio {report['prune']['pruning_ratio']:.3f}.")
    if "sparsity" in report:
        sp = report["sparsity"]
        line = (f"2:4 sparsity ({sp['method']}): {sp['layers']} layers, {sp['share_of_params']:.1%} of the student's weights "
                f"under a mask, {sp['zeroed_weights'] / 1e6:.2f}M zeroed")
        if "recovery" in sp:
            rec = sp["recovery"]
            line += f"; kept through recovery ({rec['mask_mode']}, {rec['mask_bits_changed']:.2%} of mask bits changed)"
        for role, c in sp.get("onnx", {}).items():
            line += f"; {role} ONNX: {c['compliant']} of {c['layers']} masked weights 2:4"
        if "torch_cuda" in sp:
            cuda = sp["torch_cuda"]
            line += f"; torch-cuda ran {cuda['converted']} layers on {cuda['backend']} ({cuda['dtype']})"
        lines.append(line + ".")
    if "distill" in report:
        d = report["distill"]
        terms = ", ".join(f"{k.replace('_', ' ')} {v:g}" for k, v in d.get("weights", {}).items())
        lines.append(f"Recovery: {d['steps']} steps" + (f" ({terms})" if terms else "")
                     + (f", EMA {d['ema_decay']:g}" if d.get("ema_decay") else "")
                     + (f", {d['processes']} processes" if d.get("processes", 1) > 1 else "")
                     + f", final loss {d['final_loss']:.4f}.")
    if report.get("eval", {}).get("skipped"):
        lines.append(f"Quality not measured: {report['eval']['skipped']}.")
    elif report.get("teacher_kind", "pixel") != "pixel" and "eval" in report:
        ev = report["eval"]
        lines.append(f"Quality: {ev['num_samples']} images, {ev['steps']} {ev['scheduler']} steps; PSNR / SSIM of each "
                     "model's images against the teacher's from the same prompts and seeds.")
    elif "eval" in report:
        ev = report["eval"]
        ref = ev.get("reference", {})
        lines.append(f"Quality: {ev['num_samples']} samples, {ev['steps']} {ev['scheduler'].upper()} steps, the same noise "
                     "for every model. FID on the zoo classifier's features against the real data"
                     + (f" (real images scored the same way: {ref['fid_real_subset']:.3f})" if "fid_real_subset" in ref else "")
                     + "; PSNR / SSIM of each model's samples against the teacher's.")
    if "export" in report:
        checks = ", ".join(f"{r} max |diff| {c['max_abs_error']:.1e}" for r, c in report["export"].items())
        lines.append(f"ONNX vs torch (polygraphy, ONNX Runtime CPU): {checks}.")
    if "engines" in report:
        for role, e in report["engines"].items():
            sparse = e["sparse_layers"]
            ran = (f"; sparse: {sparse['picked']} of {sparse['eligible']} eligible layers ran sparse"
                   if "SPARSE_WEIGHTS" in e["flags"] else "")
            lines.append(f"TensorRT {e['tensorrt']} engine of the {role} on {e['gpu']}: `{e['path']}` ({e['precision']}, "
                         f"flags {', '.join(e['flags']) or 'none'}, built in {e['seconds']:.0f} s{ran}).")
    if "bundle" in report:
        b = report["bundle"]
        sparse = [c for c, v in b["components"].items() if v["sparse"]]
        est = b.get("estimate")
        lines.append(f"Device bundle `bundle/` for the {b['target']}: {', '.join(b['components'])} as ONNX, built into "
                     f"TensorRT {b['engine']['precision']} engines on the device by its build_engines.sh"
                     + (f" (2:4 sparse weights: {', '.join(sparse)})" if sparse else "")
                     + f"; run.py times teacher against student there{' and serves the student' if b['serves'] else ''}. "
                     "`deploykit bench ARTIFACT --host user@device` runs it over SSH."
                     + (f" Roofline estimate on the {est['device']['name']} ({est['precision']}): teacher {est['teacher']['ms']:.2f} ms, "
                        f"student {est['student']['ms']:.2f} ms per UNet call ({est['speedup']:.2f}x)." if est else ""))
    if "verify" in report:
        v = report["verify"]
        checks = ", ".join(f"{k} {'ok' if c['passed'] else 'FAILED'}"
                           + (f" (max |diff| {c['max_abs_error']:.1e})" if c.get("max_abs_error") is not None else "")
                           for k, c in v["checks"].items())
        lines.append(f"Verify (polygraphy, torch as reference): {checks}."
                     + (" Skipped: " + "; ".join(f"{k}: {r.split(';')[0]}" for k, r in v["skipped"].items()) + "." if v["skipped"] else ""))
    lines.append("")
    if "bench" in report:
        lines += ["![latency](plots/latency.png)", ""]
    if "eval" in report and not report["eval"].get("skipped"):
        lines += ["![samples](samples/teacher_vs_student.png)", ""]
    return "\n".join(lines)


def _int8_lines(report: dict) -> list[str]:
    q = report["int8"]
    cal = q["calibration"]
    lines = []
    for b, v in q.get("speedup", {}).items():
        lines.append(f"INT8 ({b}, same run as the fp32 models): student-int8 **{v['student_int8_vs_teacher']:.2f}x** over the "
                     f"fp32 dense teacher (median of per-round ratios {v['student_int8_vs_teacher_pair_median']:.2f}x), "
                     f"{v['student_int8_vs_student']:.2f}x over the fp32 student"
                     + (f"; teacher-int8 {v['teacher_int8_vs_teacher']:.2f}x over the fp32 teacher"
                        if "teacher_int8_vs_teacher" in v else "")
                     + ".")
    model = q["models"].get("student", {})
    layers = model.get("layers", {})
    lines.append(f"Quantized with `{q['backend']}` (QDQ, {'per-channel' if model.get('per_channel', True) else 'per-tensor'} weights; "
                 f"student: {layers.get('int8', '?')} layers INT8, {layers.get('float', '?')} float, output SNR vs fp32 "
                 f"{model.get('error_vs_fp32', {}).get('snr_db', float('nan')):.1f} dB), calibrated on {cal['batches']} UNet calls "
                 f"of the teacher's own sampling ({cal['source']}, {cal['steps']} {cal['scheduler']} steps).")
    if q.get("quality_loss"):
        lines.append("Quality lost to INT8 (student-int8 against the fp32 student; positive is worse): "
                     + ", ".join(f"{m} {v:+.3f}" for m, v in q["quality_loss"].items()) + ".")
    if "gate" in q:
        limits = ", ".join(f"{m} {v:g}" for m, v in q["max_quality_loss"].items())
        lines.append(f"Quality gate (largest loss accepted: {limits}): **{q['gate']['status']}** ({q['gate']['reason']}).")
    return lines + [""]
