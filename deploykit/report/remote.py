"""Device figures from `deploykit bench ARTIFACT --host user@device`, beside the build's own.

Each run is stored as ``remote/<host>/<backend>/results.json`` (what ``run.py bench`` wrote on the device,
as it wrote it) and ``remote.json`` (which host, when, from which bundle). In ``report.json`` a run is one
more backend, named ``<backend>@<host>`` (``tensorrt@orin:22``): ``teacher`` / ``student`` latency,
``speedup`` (teacher p50 / student p50 from that one run) and ``speedup_pair_median``, plus ``remote`` with
the details and the roofline estimate of the recipe's target beside the measurement. A run counts only for
the bundle it measured: a build that changes the bundle drops it.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from deploykit.artifact import REMOTE_DIR

RESULTS = "results.json"
META = "remote.json"


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.") or "host"


def entry(results: dict, meta: dict) -> dict:
    """One report entry from a run's results.json and remote.json."""
    stand_in = meta["backend"] != "tensorrt"
    out = {
        "host": meta["host"], "backend": meta["backend"], "device": results["device"].get("name"),
        "device_info": results["device"], "precision": results.get("precision"), "shape": results.get("shape"),
        "measured": results.get("started"), "fetched": meta.get("fetched"), "remote_dir": meta.get("remote_dir"),
        "results": meta["results"], "bundle_sha256": results["bundle_sha256"], "stand_in": stand_in,
        "teacher": results["teacher"], "student": results["student"], "speedup": results["speedup"],
        "speedup_pair_median": results["speedup_pair_median"], "versions": results.get("versions", {}),
    }
    if "engines" in results:
        out["engines"] = results["engines"]
    est = meta.get("estimate")
    if est:
        out["estimate"] = {"target": est["target"], "device": est["device"]["name"], "precision": est["precision"],
                           "teacher_ms": est["teacher"]["ms"], "student_ms": est["student"]["ms"], "speedup": est["speedup"]}
        if not stand_in:
            for role in ("teacher", "student"):
                out["estimate"][f"{role}_measured_over_estimate"] = results[role]["p50_ms"] / est[role]["ms"]
    return out


def key(meta: dict) -> str:
    return f"{meta['backend']}@{meta['label']}"


def add(report: dict, name: str, e: dict, estimate: dict | None = None) -> None:
    """Put one device run into ``report`` as backend ``name``."""
    for role in ("teacher", "student"):
        if role in report:
            report[role].setdefault("latency", {})[name] = {**e[role], "device": e["device"]}
    report.setdefault("speedup", {})[name] = e["speedup"]
    report.setdefault("speedup_pair_median", {})[name] = e["speedup_pair_median"]
    report.setdefault("remote", {})[name] = e
    if estimate and not e["stand_in"]:  # the target GPU's estimate beside a measurement on that GPU
        report.setdefault("estimate", {})[name] = {
            "device": estimate["device"],
            **{role: {**estimate[role], "measured_p50_ms": e[role]["p50_ms"],
                      "measured_over_estimate": e[role]["p50_ms"] / estimate[role]["ms"]} for role in ("teacher", "student")}}


def runs(root: Path) -> list[Path]:
    base = Path(root) / REMOTE_DIR
    return sorted(p.parent for p in base.glob(f"*/*/{META}")) if base.is_dir() else []


def merge(report: dict, root: Path, bundle_sha256: str | None) -> list[Path]:
    """Add every stored run of the bundle ``bundle_sha256`` to ``report``; returns the folders of runs that measured
    another bundle (or are unreadable), for the caller to remove."""
    stale = []
    for folder in runs(root):
        try:
            meta = json.loads((folder / META).read_text())
            results = json.loads((folder / RESULTS).read_text())
            e = entry(results, meta)
        except (OSError, json.JSONDecodeError, KeyError, TypeError):
            stale.append(folder)
            continue
        if bundle_sha256 is None or e["bundle_sha256"] != bundle_sha256:
            stale.append(folder)
            continue
        add(report, key(meta), e, meta.get("estimate"))
    return stale


def remove(root: Path, folders: list[Path]) -> None:
    for folder in folders:
        shutil.rmtree(folder, ignore_errors=True)
        host = folder.parent
        if host.is_dir() and not any(host.iterdir()):
            host.rmdir()
    base = Path(root) / REMOTE_DIR
    if base.is_dir() and not any(base.iterdir()):
        base.rmdir()


def markdown(report: dict) -> list[str]:
    remote = report.get("remote") or {}
    if not remote:
        return []
    lines = ["On the device (`deploykit bench --host`: the bundle's run.py, teacher and student UNet calls interleaved in "
             "one run, same inputs):", "",
             "| backend @ host | device | precision | UNet input | teacher p50 ms | student p50 ms | speedup | per-pair median "
             "| roofline on the target: teacher / student ms (speedup) | measured / estimate |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    notes = []
    for name, e in remote.items():
        est = e.get("estimate")
        roofline = (f"{est['teacher_ms']:.2f} / {est['student_ms']:.2f} ({est['speedup']:.2f}x), {est['device']} "
                    f"{est['precision']}" if est else "–")
        ratio = (f"{est['teacher_measured_over_estimate']:.2f}x / {est['student_measured_over_estimate']:.2f}x"
                 if est and "teacher_measured_over_estimate" in est else "–")
        shape = "x".join(map(str, e.get("shape") or [])) or "–"
        lines.append(f"| {name} | {e['device']} | {e.get('precision') or '–'} | {shape} | {e['teacher']['p50_ms']:.2f} | "
                     f"{e['student']['p50_ms']:.2f} | **{e['speedup']:.2f}x** | {e['speedup_pair_median']:.2f}x | {roofline} | "
                     f"{ratio} |")
        if e["stand_in"]:
            notes.append(f"`{name}` ran ONNX Runtime on the device's CPU, the stand-in for TensorRT: its times are the "
                         "CPU's, and the roofline column is the target GPU's estimate, not comparable with them.")
        for component, eng in (e.get("engines") or {}).items():
            sparse = eng.get("sparse_layers") or {}
            notes.append(f"`{name}` {component}: TensorRT {eng.get('tensorrt')} engine `{Path(eng.get('engine', '')).name}` "
                         f"({', '.join(eng.get('flags', []))})"
                         + (f"; {sparse.get('picked', 0)} of {sparse.get('eligible', 0)} layers eligible for sparse math "
                            "ran sparse" if "SPARSE_WEIGHTS" in eng.get("flags", []) else "") + ".")
    return lines + [""] + notes + ([""] if notes else [])
