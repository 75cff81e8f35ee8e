"""report.md: the figures of report.json as a page people read."""

from __future__ import annotations

from deploykit.report.remote import markdown as remote_markdown
from deploykit.stages import STAGES
from deploykit.stages.base import COMPARED_MODELS, Markdown


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


def models_in(report: dict) -> list[str]:
    """The compared models in the report: teacher, pruned, student, then those stages added (INT8 models)."""
    return [m for m in [*COMPARED_MODELS, *(m for spec in STAGES.values() for m in spec.models)] if m in report]


def _stage_rows(report: dict) -> list[Markdown]:
    rows = (spec.markdown(report) for spec in STAGES.values() if spec.markdown is not None)
    return [r for r in rows if r is not None]


def render(report: dict) -> str:
    """report.md from report.json alone: the figures table and speedups, then each stage's rows in run order."""
    roles = models_in(report)
    backends = list(report.get("speedup", {}))
    metrics = sorted({m for r in roles for m in report[r].get("quality", {})})
    stage_rows = _stage_rows(report)
    lines = [f"# deploykit report: {report['recipe']}", ""]
    lines.append(f"Teacher `{report.get('teacher_source')}`, target `{report['target']}`.")
    if report.get("random_weights"):
        lines.append("**Random weights: these figures measure speed, never quality.**")
    if report.get("skipped"):
        lines.append("Stages skipped: " + "; ".join(f"`{name}` ({why})" for name, why in report["skipped"].items())
                     + ". Each passed its inputs on: the stages after it ran on what came before it.")
    lines += [line for rows in stage_rows for line in rows.caption]
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
        lines.append("`pruned` is the student before distill; it has the student's graph, so it is timed once, as the student.")
        lines.append("")
    if backends:
        lines.append("| backend | speedup (teacher p50 / student p50) | median of per-pair ratios |")
        lines.append("|---|---|---|")
        for b in backends:
            lines.append(f"| {b} | **{report['speedup'][b]:.2f}x** | {report['speedup_pair_median'][b]:.2f}x |")
        lines.append("")
    lines += remote_markdown(report)
    for rows in stage_rows:
        if rows.body:
            lines += rows.body + ([""] if rows.body[-1] else [])
    for rows in stage_rows:
        for figure in rows.figures:
            lines += [figure, ""]
    return "\n".join(lines)
