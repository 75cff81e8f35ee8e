#!/usr/bin/env python3
"""build_engines.py: this bundle's TensorRT engines, built on this device with its own TensorRT.

    sh build_engines.sh                     every engine bundle.json lists, skipping those already built
    sh build_engines.sh --force             build them all again
    sh build_engines.sh --only student/unet
    sh build_engines.sh --trtexec           use trtexec (JetPack: /usr/src/tensorrt/bin/trtexec) instead of the
                                            Python API; the default where `import tensorrt` fails
    sh build_engines.sh --dry-run           print what would be built, with the equivalent trtexec commands

Per component (``teacher/unet``, ``student/unet`` and, for serving, ``student/text_encoder`` and
``student/vae_decoder``): fp16 (``BuilderFlag.FP16`` / ``--fp16``), INT8 for QDQ graphs, 2:4 sparse weights
where the model carries 2:4 masks (``SPARSE_WEIGHTS`` / ``--sparsity=enable``), one optimization profile
from the recipe's batch and resolution, a timing cache shared by the builds (``engines/timing.cache``),
and the build log beside each engine (TensorRT lists there the layers it ran sparse). Engines are named by
board / GPU and TensorRT version: ``engines/student/unet/<gpu>_trt<version>_<precision>[-sparse].engine``.
``engines/engines.json`` records what was built, from which ONNX (sha256), with which flags.

This file is ``deploykit/export/bundle_build.py`` in deploykit's source tree; the bundle ships it beside
``trt_build.py``, a copy of ``deploykit/export/tensorrt.py`` (the engine stage's own builder), and needs no
deploykit on the device.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

HERE = Path(__file__).resolve().parent
if TYPE_CHECKING:
    from deploykit.export import tensorrt as trt_build
else:
    sys.path.insert(0, str(HERE))
    try:
        import trt_build  # the bundle's copy of deploykit/export/tensorrt.py
    except ImportError:  # run from deploykit's source tree
        from deploykit.export import tensorrt as trt_build

ENGINES = "engines"
ENGINES_JSON = "engines/engines.json"
TRTEXEC_PATHS = ("/usr/src/tensorrt/bin/trtexec", "/usr/local/tensorrt/bin/trtexec")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def gpu_label() -> str:
    """The board on a Jetson (/proc/device-tree/model: an AGX Orin and an Orin Nano are both "Orin" to CUDA),
    else CUDA's device name (torch, then nvidia-smi)."""
    try:
        model = Path("/proc/device-tree/model").read_bytes().replace(b"\x00", b"").decode().strip()
        if model:
            return model
    except OSError:
        pass
    try:
        import torch

        if torch.cuda.is_available():
            return str(torch.cuda.get_device_name(0))
    except ImportError:
        pass
    smi = shutil.which("nvidia-smi")
    if smi:
        out = subprocess.run([smi, "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip().splitlines()[0]
    return "unknown-gpu"


def find_trtexec() -> str | None:
    found = shutil.which("trtexec")
    return found or next((p for p in TRTEXEC_PATHS if os.access(p, os.X_OK)), None)


def trtexec_version(trtexec: str) -> str:
    """TensorRT's version from trtexec's banner, ``[TensorRT v100300]`` -> ``10.3.0`` (``v8601`` -> ``8.6.1``)."""
    out = subprocess.run([trtexec, "--help"], capture_output=True, text=True)
    match = re.search(r"TensorRT v(\d+)", out.stdout + out.stderr)
    if not match:
        raise SystemExit(f"error: cannot read TensorRT's version from `{trtexec} --help`")
    n = int(match.group(1))
    if n >= 100000:  # TensorRT 10+: MMmmpp
        return f"{n // 10000}.{n // 100 % 100}.{n % 100}"
    return f"{n // 1000}.{n // 100 % 10}.{n % 100}"


def shape_arg(profile: dict, which: int) -> str:
    """``name:1x4x64x64,...`` for trtexec; 0-d inputs (a scalar timestep) have no shape to give."""
    return ",".join(f"{name}:{'x'.join(str(d) for d in shapes[which])}" for name, shapes in profile.items() if shapes[which])


def trtexec_command(trtexec: str, onnx: Path, engine: Path, spec: dict, settings: dict, cache: Path | None) -> list[str]:
    cmd = [trtexec, f"--onnx={onnx}", f"--saveEngine={engine}", "--skipInference", "--verbose",
           f"--memPoolSize=workspace:{int(settings['workspace_gb'] * 1024)}M",
           f"--builderOptimizationLevel={settings['optimization_level']}"]
    cmd += ["--fp16"] + (["--int8"] if spec["int8"] else []) + (["--sparsity=enable"] if spec["sparse"] else [])
    if any(s[0] for s in spec["profile"].values()):
        cmd += [f"--minShapes={shape_arg(spec['profile'], 0)}", f"--optShapes={shape_arg(spec['profile'], 1)}",
                f"--maxShapes={shape_arg(spec['profile'], 2)}"]
    if cache is not None:
        cmd.append(f"--timingCacheFile={cache}")
    return cmd


def build_with_trtexec(cmd: list[str], engine: Path, log_path: Path) -> dict:
    started = time.perf_counter()
    engine.parent.mkdir(parents=True, exist_ok=True)
    tmp = engine.with_name(f".{engine.name}.tmp")
    cmd = [f"--saveEngine={tmp}" if c.startswith("--saveEngine=") else c for c in cmd]
    out = subprocess.run(cmd, capture_output=True, text=True)
    log_path.write_text(out.stdout + out.stderr)
    if out.returncode != 0 or not tmp.is_file():
        tail = "\n".join((out.stdout + out.stderr).strip().splitlines()[-10:])
        tmp.unlink(missing_ok=True)
        raise SystemExit(f"error: trtexec failed to build {engine.name} (log: {log_path}):\n{tail}")
    tmp.replace(engine)
    lines = trt_build.sparse_layer_lines((out.stdout + out.stderr).splitlines())
    return {"seconds": round(time.perf_counter() - started, 2), "sparse": trt_build.sparse_summary(lines)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="build_engines.py", description="Build this bundle's TensorRT engines here.")
    parser.add_argument("--bundle", default=str(HERE), help="the bundle folder (default: this script's)")
    parser.add_argument("--only", action="append", default=[], help="a component (teacher/unet, student/unet, ...)")
    parser.add_argument("--force", action="store_true", help="build again even where an engine is up to date")
    parser.add_argument("--trtexec", action="store_true", help="build with trtexec instead of the Python API")
    parser.add_argument("--workspace-gb", type=float, help="builder workspace (default: bundle.json)")
    parser.add_argument("--dry-run", action="store_true", help="print what would be built and the trtexec commands")
    args = parser.parse_args(argv)
    root = Path(args.bundle).resolve()
    manifest = json.loads((root / "bundle.json").read_text())
    settings = dict(manifest["engine"])
    if args.workspace_gb:
        settings["workspace_gb"] = args.workspace_gb
    unknown = [c for c in args.only if c not in manifest["components"]]
    if unknown:
        raise SystemExit(f"error: no component {unknown[0]} (bundle.json has {', '.join(manifest['components'])})")

    missing = trt_build.tensorrt_missing()
    trtexec = find_trtexec() if (args.trtexec or missing) else None
    if missing and trtexec is None and not args.dry_run:
        raise SystemExit(f"error: {missing}; and no trtexec was found (JetPack: /usr/src/tensorrt/bin/trtexec, "
                         "from `sudo apt install nvidia-jetpack` or tensorrt)")
    if args.trtexec and trtexec is None and not args.dry_run:
        raise SystemExit("error: --trtexec: no trtexec on PATH or in " + ", ".join(TRTEXEC_PATHS))
    if trtexec is not None:
        version = trtexec_version(trtexec)
    elif missing is None:
        import tensorrt as trt

        version = str(trt.__version__)
    else:
        version = "unknown"
    gpu = gpu_label()
    log(f"building on {gpu} with TensorRT {version} ({'trtexec' if trtexec else 'Python API'})")

    table_path = root / ENGINES_JSON
    table: dict = json.loads(table_path.read_text()) if table_path.is_file() else {}
    cache = root / ENGINES / "timing.cache" if settings.get("timing_cache", True) else None
    for component, spec in manifest["components"].items():
        if args.only and component not in args.only:
            continue
        precision = "int8" if spec["int8"] else "fp16"
        name = trt_build.engine_name(gpu, version, precision, spec["sparse"])
        engine = root / ENGINES / component / name
        onnx = root / spec["onnx"]
        onnx_sha = manifest["files"][spec["onnx"]]
        flags = trt_build.builder_flag_names(True, spec["int8"], spec["sparse"])
        previous = table.get(component, {})
        if (not args.force and previous.get("engine") == engine.relative_to(root).as_posix() and engine.is_file()
                and previous.get("onnx_sha256") == onnx_sha and previous.get("flags") == flags
                and previous.get("profile") == spec["profile"] and previous.get("engine_sha256") == sha256_file(engine)):
            log(f"{component}: up to date ({engine.relative_to(root)})")
            continue
        if args.dry_run:
            log(f"{component}: would build {engine.relative_to(root)} ({', '.join(flags)})")
            print(" ".join(trtexec_command(trtexec or "trtexec", onnx, engine, spec, settings, cache)))
            continue
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
        log(f"{component}: building {engine.relative_to(root)} ({', '.join(flags)}) ...")
        log_path = engine.with_suffix(".log")
        engine.parent.mkdir(parents=True, exist_ok=True)
        if trtexec is not None:
            built = build_with_trtexec(trtexec_command(trtexec, onnx, engine, spec, settings, cache), engine, log_path)
        else:
            profiles = {k: tuple(tuple(s) for s in v) for k, v in spec["profile"].items()}
            result = trt_build.build_engine(onnx, engine, fp16=True, int8=spec["int8"], sparse_weights=spec["sparse"],
                                            profiles=profiles, timing_cache=cache, workspace_gb=settings["workspace_gb"],
                                            log_path=log_path, optimization_level=settings["optimization_level"])
            built = {"seconds": result.seconds, "sparse": result.sparse}
        sparse = built["sparse"]
        table[component] = {"engine": engine.relative_to(root).as_posix(), "engine_sha256": sha256_file(engine),
                            "onnx": spec["onnx"], "onnx_sha256": onnx_sha, "precision": precision, "flags": flags,
                            "profile": spec["profile"], "gpu": gpu, "tensorrt": version,
                            "builder": "trtexec" if trtexec else "python", "seconds": built["seconds"],
                            "log": log_path.relative_to(root).as_posix(),
                            "sparse_layers": {"eligible": len(sparse.get("eligible", [])),
                                              "picked": len(sparse.get("picked", []))},
                            "sparse_lines": sparse.get("lines", [])}
        log(f"{component}: built in {built['seconds']:.0f} s"
            + (f"; sparse: {len(sparse.get('picked', []))} of {len(sparse.get('eligible', []))} eligible layers ran sparse"
               if spec["sparse"] else ""))
        table_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = table_path.with_name(f".{table_path.name}.tmp")
        tmp.write_text(json.dumps(table, indent=2) + "\n")
        tmp.replace(table_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
