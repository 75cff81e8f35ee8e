"""The device bundle: everything a Jetson needs to build TensorRT engines and time and serve them, without deploykit.

```
bundle/
  bundle.json        shapes, engine settings and profiles, each graph's inputs and outputs by role, the roofline
                     estimate, sha256 of every file
  README.txt         the commands, on the device and from the workstation
  run.py             bench (teacher vs student UNet steps) and serve (the student); numpy, Pillow + tensorrt / onnxruntime
  build_engines.sh   builds the engines on the device: python3 build_engines.py (TensorRT's Python API or trtexec)
  build_engines.py   the engine stage's builder (copies of deploykit.engines.tensorrt's functions) for the device
  onnx/teacher/unet/  onnx/student/unet/                 the graphs to build from (and what onnxruntime-cpu runs)
  onnx/student/{text_encoder,vae_decoder,tokenizer}/     SD: what serving needs besides the UNet
  engines/           made on the device by build_engines.sh (engines.json, *.engine, *.log, timing.cache)
```

``run.py`` and ``build_engines.py`` are ``deploykit/device/scripts/`` in deploykit's source tree, under the
names they have on the device, shipped as package data and copied verbatim: they import nothing from
deploykit. Where they repeat a deploykit function, the copy says so (``# Copied from deploykit...``) and
``utils/check_copies.py`` keeps it equal to its source.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from deploykit.errors import InputError
from deploykit.io import atomic_write_json, atomic_write_text, sha256_file
from deploykit.paths import OutsideFolder, inside

SCRIPTS_DIR = Path(__file__).resolve().parent / "scripts"
SCRIPTS = ("run.py", "build_engines.py")  # executables, copied as they are
FORMAT = 2  # 2: each graph's inputs and outputs carry their roles (models.io_spec), which run.py feeds by
MANIFEST = "bundle.json"
BUILD_SH = """\
#!/bin/sh
# Build this bundle's TensorRT engines on this device, with its own TensorRT (see README.txt).
# Options go to build_engines.py: --force, --only COMPONENT, --trtexec, --dry-run, --workspace-gb N.
set -eu
cd "$(dirname "$0")"
exec "${PYTHON:-python3}" build_engines.py "$@"
"""


def link_or_copy(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """A hard link where the file system allows it (a bundle repeats multi-GB graphs the export stage holds;
    artifact files are only ever replaced, never written in place), else a copy."""
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def copy_folder(src: Path, dst: Path, skip: tuple[str, ...] = ()) -> list[str]:
    """Every file under ``src`` into ``dst`` (linked where possible); returns the relative paths."""
    copied = []
    for path in sorted(src.rglob("*")):
        rel = path.relative_to(src)
        if path.is_file() and rel.parts[0] not in skip and not any(p.startswith(".") for p in rel.parts):
            link_or_copy(path, dst / rel)
            copied.append(rel.as_posix())
    return copied


def write_scripts(out: Path) -> None:
    for name in SCRIPTS:
        shutil.copyfile(SCRIPTS_DIR / name, out / name)
        (out / name).chmod(0o755)
    atomic_write_text(out / "build_engines.sh", BUILD_SH)
    (out / "build_engines.sh").chmod(0o755)


def readme(manifest: dict) -> str:
    components = "\n".join(f"  {c}: {s['onnx']} ({'int8' if s['int8'] else 'fp16'}{', 2:4 sparse weights' if s['sparse'] else ''})"
                           for c, s in manifest["components"].items())
    serve = ("  python3 run.py serve --port 8000            # the student: POST /generate {\"prompt\": \"...\"} -> PNG\n"
             "  curl -s localhost:8000/generate -d '{\"prompt\": \"a red bicycle\", \"steps\": 20, \"seed\": 0}' -o out.png\n"
             if manifest["kind"] == "pixel" or manifest.get("pipeline") else
             "  (this bundle ships the UNets only: it benchmarks, it does not serve)\n")
    est = manifest.get("estimate") or {}
    estimate = (f"Roofline estimate on the {manifest['target']} ({est['device']['name']}, {est['precision']}): teacher "
                f"{est['teacher']['ms']:.1f} ms, student {est['student']['ms']:.1f} ms per UNet call "
                f"({est['speedup']:.2f}x).\n\n" if est else "")
    return f"""deploykit device bundle: {manifest['recipe']} (target {manifest['target']}, deploykit {manifest['deploykit']})

The dense teacher's and the pruned student's UNets as ONNX, a script that builds TensorRT engines on this
device with its own TensorRT, and run.py, which times them and serves the student. Nothing here needs
deploykit. On a Jetson (JetPack 6: TensorRT 10, Python 3.10):

  sudo apt install python3-libnvinfer python3-numpy python3-pil   # TensorRT's bindings, numpy, Pillow (run.py's PNGs)
  pip3 install torch  (JetPack's wheel, https://pypi.jetson-ai-lab.dev/jp6/cu126: run.py keeps GPU buffers in torch)

  python3 run.py verify                        # every file against bundle.json; numpy and Pillow import
  sh build_engines.sh                          # engines/: fp16, 2:4 sparse where the model has masks, timing cache
  python3 run.py bench --backend tensorrt --out results.json
{serve}
Without TensorRT (any machine with numpy, Pillow and onnxruntime; the CPU stand-in):

  python3 run.py bench --backend onnxruntime-cpu --out results.json

From the workstation, `deploykit bench ARTIFACT --host user@device` copies this folder over SSH, runs the two
steps above and brings results.json back into the artifact's report.

bench: UNet input {'x'.join(map(str, manifest['bench']['inputs'][0]['shape']))}, teacher and student interleaved
(A B, B A, ...) on the same inputs after {manifest['bench']['warmup']} warm-up pairs, {manifest['bench']['runs']} timed pairs;
p50 / p90 per model, speedup = teacher p50 / student p50, and the median of per-pair ratios.

{estimate}Engines (optimization profiles in bundle.json; engines named <board or GPU>_trt<version>_<precision>):
{components}
"""


def finish(out: Path, manifest: dict) -> dict:
    """Hash every file, write bundle.json and README.txt; returns the manifest as written."""
    write_scripts(out)
    atomic_write_text(out / "README.txt", readme(manifest))
    files = {p.relative_to(out).as_posix(): sha256_file(p) for p in sorted(out.rglob("*"))
             if p.is_file() and p.name != MANIFEST and not any(x.startswith(".") for x in p.relative_to(out).parts)}
    manifest = {**manifest, "files": files}
    atomic_write_json(out / MANIFEST, manifest)
    return manifest


def manifest_sha256(bundle_dir: Path) -> str:
    """What identifies a bundle's content: the sha256 of its bundle.json (which lists every other file's)."""
    return hashlib.sha256((Path(bundle_dir) / MANIFEST).read_bytes()).hexdigest()


def listed_paths(manifest: dict) -> list[tuple[str, object]]:
    """Every path bundle.json names, relative to the bundle, with the entry that names it: the files, each
    graph, the tokenizer, and the engine folder each component's name becomes on the device. A table that
    is not one (``files`` not an object) is listed as itself, for the check to refuse."""
    files, components, pipeline = manifest.get("files"), manifest.get("components"), manifest.get("pipeline")
    if not isinstance(files, dict) or not isinstance(components, dict):
        return [(name, table) for name, table in (("files", files), ("components", components))
                if not isinstance(table, dict)]
    paths: list[tuple[str, object]] = [(f"files[{rel!r}]", rel) for rel in files]
    for name, spec in components.items():
        paths.append((f"components[{name!r}]", f"engines/{name}"))
        paths.append((f"components[{name!r}].onnx", spec.get("onnx") if isinstance(spec, dict) else spec))
    if isinstance(pipeline, dict):
        paths.append(("pipeline.tokenizer", pipeline.get("tokenizer")))
    return paths


def path_problems(root: Path, manifest: dict) -> list[str]:
    """The entries of ``manifest`` naming a path that is not inside the bundle folder ``root`` (``..``,
    absolute, through a symlink out of it). A bundle may come from someone else: its readers, here and on
    the device, open nothing bundle.json names until this finds no problem."""
    problems = []
    for entry, rel in listed_paths(manifest):
        try:
            inside(root, rel)
        except OutsideFolder as e:
            problems.append(f"{entry}: {e}")
    return problems


def read_manifest(bundle_dir: Path) -> dict:
    """bundle.json, refused (InputError) where it is not JSON or names a path outside the bundle."""
    path = Path(bundle_dir) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: cannot read the bundle manifest ({e})") from None
    if not isinstance(manifest, dict):
        raise InputError(f"{path}: not a bundle manifest (a JSON object)")
    problems = path_problems(Path(bundle_dir), manifest)
    if problems:
        raise InputError(f"{path} names paths outside the bundle (refused: nothing was read or sent):\n  "
                         + "\n  ".join(problems[:10]))
    return manifest
