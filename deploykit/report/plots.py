"""Plots for the report (matplotlib, no display needed)."""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from deploykit.io import atomic_write_bytes  # noqa: E402


def _save(fig, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def latency_bars(path: Path, bench: dict) -> None:
    backends = list(bench["backends"])
    fig, ax = plt.subplots(figsize=(1.8 + 2.2 * len(backends), 3.6))
    width = 0.38
    for i, (role, color) in enumerate((("teacher", "#8c8c8c"), ("student", "#2a7ab9"))):
        p50 = [bench["backends"][b][role]["p50_ms"] for b in backends]
        p90 = [bench["backends"][b][role]["p90_ms"] for b in backends]
        xs = [k + (i - 0.5) * width for k in range(len(backends))]
        ax.bar(xs, p50, width, label=role, color=color,
               yerr=[[0] * len(p50), [b - a for a, b in zip(p50, p90)]], capsize=3)
    for k, b in enumerate(backends):
        top = max(bench["backends"][b]["teacher"]["p90_ms"], bench["backends"][b]["student"]["p90_ms"])
        ax.text(k, top * 1.03, f"{bench['backends'][b]['speedup']:.2f}x", ha="center", fontweight="bold")
    ax.set_xticks(range(len(backends)), backends)
    ax.set_ylabel("ms per UNet call (p50, bar to p90)")
    shape = "x".join(str(s) for s in bench["shape"])
    ax.set_title(f"UNet latency, {shape} {bench['precision']}, {bench['device']['threads']} threads", fontsize=9)
    ax.legend(loc="upper right", fontsize=8)
    ax.margins(y=0.15)
    _save(fig, path)


def loss_curve(path: Path, losses: list[dict]) -> None:
    fig, ax = plt.subplots(figsize=(6, 3.4))
    steps = [r["step"] for r in losses]
    for key in [k for k in losses[0] if k != "step"]:
        values = [r[key] for r in losses]
        window = max(1, len(values) // 40)
        smooth = [sum(values[max(0, i - window + 1):i + 1]) / len(values[max(0, i - window + 1):i + 1])
                  for i in range(len(values))]
        ax.plot(steps, smooth, label=key)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (moving average)")
    ax.set_title("recovery fine-tuning", fontsize=9)
    ax.legend(fontsize=8)
    _save(fig, path)
