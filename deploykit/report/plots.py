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


def _moving_average(values: list[float], window: int) -> list[float]:
    return [sum(values[max(0, i - window + 1):i + 1]) / len(values[max(0, i - window + 1):i + 1]) for i in range(len(values))]


# The hinge GAN terms go negative (the student's) or hover near 2 (the critic's): a linear axis of their own.
ADVERSARIAL_TERMS = ("adversarial", "discriminator")


def loss_curve(path: Path, losses: list[dict]) -> None:
    """One line per loss term (moving average, log y); the adversarial terms, when present, on a second panel."""
    keys = list(dict.fromkeys(k for r in losses for k in r if k != "step"))  # every term, in first-seen order
    adversarial = [k for k in keys if k in ADVERSARIAL_TERMS]
    fig, axes = plt.subplots(1, 2 if adversarial else 1, figsize=(10.5 if adversarial else 6, 3.4), squeeze=False)
    for ax, group, log in ((axes[0][0], [k for k in keys if k not in ADVERSARIAL_TERMS], True),
                           *(((axes[0][1], adversarial, False),) if adversarial else ())):
        for key in group:
            rows = [r for r in losses if key in r]  # the adversarial terms start after their warm-up
            window = max(1, len(rows) // 40)
            ax.plot([r["step"] for r in rows], _moving_average([r[key] for r in rows], window), label=key)
        if log:
            ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("loss (moving average)")
        ax.legend(fontsize=8)
    axes[0][0].set_title("distill", fontsize=9)
    if adversarial:
        axes[0][1].set_title("adversarial terms (hinge)", fontsize=9)
    _save(fig, path)
