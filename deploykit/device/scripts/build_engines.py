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

This file is ``deploykit/device/scripts/build_engines.py`` in deploykit's source tree, copied into every bundle
as it is. It needs no deploykit on the device: the engine stage's builder code it runs is copied in below
from ``deploykit/engines/tensorrt.py`` (each copy marked ``# Copied from``; ``utils/check_copies.py`` keeps
the copies equal to their sources), and so are the few helpers it shares with deploykit.
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
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import tensorrt as trt

HERE = Path(__file__).resolve().parent
ENGINES = "engines"
ENGINES_JSON = "engines/engines.json"
TRTEXEC_PATHS = ("/usr/src/tensorrt/bin/trtexec", "/usr/local/tensorrt/bin/trtexec")


class BuildError(Exception):
    """A build that cannot go on, said in one line (deploykit's DeployKitError / InputError in the copies below)."""


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# Copied from deploykit.io.sha256_file
def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# Copied from deploykit.io._umask
def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# Copied from deploykit.io.atomic_write_chunks
def atomic_write_chunks(path: str | os.PathLike, chunks: Iterable[bytes | memoryview]) -> None:
    """Write ``chunks`` one after the other, atomically: a large file never has to fit in memory whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp's 0600 would survive the rename
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# Copied from deploykit.io.atomic_write_bytes
def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    atomic_write_chunks(path, [data])


# Copied from deploykit.io.atomic_write_text
def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


# Copied from deploykit.paths.OutsideFolder
class OutsideFolder(ValueError):
    """A path that leaves the folder it must stay in; the message says how, for the caller to prefix
    with the file and the entry it came from."""


# Copied from deploykit.paths._within
def _within(real: str, real_root: str) -> bool:
    return real == real_root or real.startswith(real_root.rstrip(os.sep) + os.sep)


# Copied from deploykit.paths.inside
def inside(root: str | os.PathLike, rel: object) -> Path:
    """``root / rel``, where ``rel`` must be a relative path that stays in ``root`` with symlinks followed.

    Raises :class:`OutsideFolder` for anything else: not a string, empty, absolute, with a ``..`` part,
    or leading out through a symlink (checked whether or not the final file exists).
    """
    if not isinstance(rel, str) or not rel or "\x00" in rel:
        raise OutsideFolder(f"{rel!r} is not a relative path")
    if rel.startswith(("/", "\\")) or PureWindowsPath(rel).drive:
        raise OutsideFolder(f"{rel!r} is an absolute path")
    if ".." in PurePosixPath(rel.replace("\\", "/")).parts:
        raise OutsideFolder(f"{rel!r} goes up out of the folder ('..')")
    path = Path(root) / rel
    real = os.path.realpath(path)
    if not _within(real, os.path.realpath(root)):
        raise OutsideFolder(f"{rel!r} leads out of the folder through a symlink (to {real})")
    return path


# Copied from deploykit.device.bundle.listed_paths
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


# Copied from deploykit.device.bundle.path_problems
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


# ----------------------------------------------------------------------------------------------
# TensorRT: the engine stage's builder


# Copied from deploykit.engines.tensorrt.tensorrt_missing
def tensorrt_missing() -> str | None:
    """Why TensorRT cannot be used here, or None when ``import tensorrt`` works."""
    try:
        import tensorrt  # noqa: F401
    except ImportError as e:
        return (f"TensorRT is not installed ({e}); install TensorRT 10 (NVIDIA's `tensorrt` wheels, "
                "`pip install 'deploykit[tensorrt]'` where pypi.nvidia.com is reachable) or build in the "
                "docker/Dockerfile.x86 / docker/Dockerfile.jetson images")
    except Exception as e:  # a broken install (missing libnvinfer, no CUDA driver) fails on import too
        return f"TensorRT does not load: {type(e).__name__}: {e}"
    if not hasattr(tensorrt, "Builder"):
        # tensorrt-stubs alone installs a bare tensorrt/ folder of .pyi files, which imports as an empty namespace
        return ("TensorRT is not installed (`tensorrt` here is only a folder of type stubs, tensorrt-stubs); install "
                "TensorRT 10 (NVIDIA's `tensorrt` wheels) or build in the docker/Dockerfile.x86 / docker/Dockerfile.jetson images")
    return None


# Copied from deploykit.engines.tensorrt._slug
def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9.]+", "-", text.lower()).strip("-") or "unknown"


# Copied from deploykit.engines.tensorrt.engine_name
def engine_name(gpu_name: str, trt_version: str, precision: str, sparse: bool = False) -> str:
    """``<gpu>_trt<version>_<precision>[-sparse].engine``: an engine runs only on the GPU model and
    TensorRT version it was built with, so both are in its name.

    >>> engine_name("NVIDIA H100 80GB HBM3", "10.13.0.35", "fp16")
    'nvidia-h100-80gb-hbm3_trt10.13.0.35_fp16.engine'
    """
    return f"{_slug(gpu_name)}_trt{_slug(trt_version)}_{precision}{'-sparse' if sparse else ''}.engine"


# Copied from deploykit.engines.tensorrt._SPARSE_PATTERNS
_SPARSE_PATTERNS = (
    re.compile(r"sparse", re.IGNORECASE),
    re.compile(r"structured sparsity", re.IGNORECASE),
)


# Copied from deploykit.engines.tensorrt.sparse_layer_lines
def sparse_layer_lines(log_lines: Iterable[str]) -> list[str]:
    """The build log's lines about 2:4 sparsity, e.g. "(Sparsity) Layers eligible for sparse math: ..."
    and "(Sparsity) TRT inference plan picked sparse implementation for layers: ..."."""
    return [line.strip() for line in log_lines if any(p.search(line) for p in _SPARSE_PATTERNS)]


# Copied from deploykit.engines.tensorrt.sparse_summary
def sparse_summary(lines: Sequence[str]) -> dict:
    """Layers TensorRT found eligible for sparse math and layers it ran sparse, from :func:`sparse_layer_lines`."""

    def layers(marker: str) -> list[str]:
        found: list[str] = []
        for line in lines:
            if marker in line.lower() and ":" in line:
                found += [x.strip() for x in line.split(":", 1)[1].split(",") if x.strip()]
        return found

    eligible = layers("eligible for sparse math")
    picked = layers("picked sparse implementation")
    return {"eligible": eligible, "picked": picked, "lines": list(lines)}


# Copied from deploykit.engines.tensorrt.builder_flag_names
def builder_flag_names(fp16: bool, int8: bool, sparse_weights: bool, strongly_typed: bool = False) -> list[str]:
    """Names of the ``trt.BuilderFlag`` members a build sets. A strongly typed network takes its
    precision from the graph: FP16 / INT8 flags are not allowed there and are left out."""
    flags = [] if strongly_typed else ["FP16"] * fp16 + ["INT8"] * int8
    return flags + ["SPARSE_WEIGHTS"] * sparse_weights


# Copied from deploykit.engines.tensorrt.require_tensorrt with DeployKitError->BuildError, InputError->BuildError
def require_tensorrt() -> None:
    """Raise a :class:`BuildError` saying why when ``import tensorrt`` fails."""
    reason = tensorrt_missing()
    if reason is not None:
        raise BuildError(reason)


# Copied from deploykit.engines.tensorrt.BuildResult
@dataclass
class BuildResult:
    engine: Path
    seconds: float
    trt_version: str
    flags: list[str]
    profiles: dict[str, list[list[int]]]
    sparse: dict = field(default_factory=dict)
    log: Path | None = None
    timing_cache: Path | None = None

    def as_dict(self) -> dict:
        return {"engine": self.engine.name, "seconds": self.seconds, "tensorrt": self.trt_version, "flags": self.flags,
                "profiles": self.profiles, "sparse": self.sparse, "log": self.log.name if self.log else None}


# Copied from deploykit.engines.tensorrt._make_logger
def _make_logger(lines: list[str], min_severity: trt.ILogger.Severity) -> trt.ILogger:
    import tensorrt as trt

    class CapturingLogger(trt.ILogger):
        """Keeps every message at or above ``min_severity`` (kVERBOSE carries the sparse-layer lines)."""

        def __init__(self) -> None:
            trt.ILogger.__init__(self)

        def log(self, severity: trt.ILogger.Severity, msg: str) -> None:
            if int(severity) <= int(min_severity):  # lower is more severe: kINTERNAL_ERROR = 0 ... kVERBOSE = 4
                lines.append(f"[{severity.name}] {msg}")

    logger: trt.ILogger = CapturingLogger()
    return logger


# Copied from deploykit.engines.tensorrt.build_engine with DeployKitError->BuildError, InputError->BuildError
def build_engine(onnx_path: str | Path, engine_path: str | Path, *, fp16: bool = True, int8: bool = False,
                 sparse_weights: bool = False, profiles: Mapping[str, tuple[tuple[int, ...], ...]] | None = None,
                 timing_cache: str | Path | None = None, workspace_gb: float = 4.0, log_path: str | Path | None = None,
                 strongly_typed: bool = False, optimization_level: int = 3, verbose: bool = True) -> BuildResult:
    """Build and write a serialized TensorRT engine from ``onnx_path`` (external data beside it is read).

    ``profiles``: input name -> (min, opt, max) shapes, one optimization profile (a component description's ``input_profile``);
    ``timing_cache``: loaded when the file exists, written back after the build (tactic timings are
    reused across builds on the same GPU); ``log_path``: the builder's messages (kVERBOSE when
    ``verbose``, which is where TensorRT lists the layers it ran sparse). The engine file appears only
    once complete.
    """
    require_tensorrt()
    import tensorrt as trt

    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    lines: list[str] = []
    severity = trt.ILogger.Severity.VERBOSE if verbose else trt.ILogger.Severity.INFO
    logger = _make_logger(lines, severity)
    started = time.perf_counter()
    flag_names = builder_flag_names(fp16, int8, sparse_weights, strongly_typed)

    builder = trt.Builder(logger)
    network_flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if strongly_typed else 0
    network = builder.create_network(network_flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # resolves model.onnx_data beside the file
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise BuildError(f"TensorRT could not parse {onnx_path}: " + "; ".join(errors[:5]))

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    config.builder_optimization_level = optimization_level
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    for name in flag_names:
        config.set_flag(getattr(trt.BuilderFlag, name))

    used_profiles: dict[str, list[list[int]]] = {}
    if profiles:
        profile = builder.create_optimization_profile()
        for i in range(network.num_inputs):
            tensor = network.get_input(i)
            if tensor.name not in profiles:
                raise BuildError(f"engine profile: no shapes for input {tensor.name!r} of {onnx_path}")
            lo, opt, hi = profiles[tensor.name]
            profile.set_shape(tensor.name, trt.Dims(list(lo)), trt.Dims(list(opt)), trt.Dims(list(hi)))
            used_profiles[tensor.name] = [list(lo), list(opt), list(hi)]
        config.add_optimization_profile(profile)

    cache_path = Path(timing_cache) if timing_cache else None
    if cache_path is not None:
        blob = cache_path.read_bytes() if cache_path.is_file() else b""
        cache = config.create_timing_cache(blob)
        config.set_timing_cache(cache, ignore_mismatch=False)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        tail = "\n".join(lines[-10:])
        raise BuildError(f"TensorRT failed to build an engine from {onnx_path}:\n{tail}")

    engine_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = engine_path.with_name(f".{engine_path.name}.tmp")
    tmp.write_bytes(bytes(serialized))
    tmp.replace(engine_path)
    if cache_path is not None:
        updated = config.get_timing_cache()
        if updated is not None:
            cache_tmp = cache_path.with_name(f".{cache_path.name}.tmp")
            cache_tmp.write_bytes(bytes(updated.serialize()))
            cache_tmp.replace(cache_path)
    log_file = Path(log_path) if log_path else None
    if log_file is not None:
        log_file.write_text("\n".join(lines) + "\n")
    return BuildResult(engine=engine_path, seconds=round(time.perf_counter() - started, 2), trt_version=trt.__version__,
                       flags=flag_names, profiles=used_profiles, sparse=sparse_summary(sparse_layer_lines(lines)),
                       log=log_file, timing_cache=cache_path)


# ----------------------------------------------------------------------------------------------
# building this bundle's engines


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
    lines = sparse_layer_lines((out.stdout + out.stderr).splitlines())
    return {"seconds": round(time.perf_counter() - started, 2), "sparse": sparse_summary(lines)}


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
    problems = path_problems(root, manifest)
    if problems:  # a bundle may come from someone else: nothing is read or written outside it
        raise SystemExit(f"error: {root / 'bundle.json'} names paths outside the bundle: " + "; ".join(problems[:5]))
    settings = dict(manifest["engine"])
    if args.workspace_gb:
        settings["workspace_gb"] = args.workspace_gb
    unknown = [c for c in args.only if c not in manifest["components"]]
    if unknown:
        raise SystemExit(f"error: no component {unknown[0]} (bundle.json has {', '.join(manifest['components'])})")

    missing = tensorrt_missing()
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
        name = engine_name(gpu, version, precision, spec["sparse"])
        engine = root / ENGINES / component / name
        onnx = root / spec["onnx"]
        onnx_sha = manifest["files"][spec["onnx"]]
        flags = builder_flag_names(True, spec["int8"], spec["sparse"])
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
            result = build_engine(onnx, engine, fp16=True, int8=spec["int8"], sparse_weights=spec["sparse"],
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
        atomic_write_text(table_path, json.dumps(table, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BuildError as e:
        log(f"error: {e}")
        sys.exit(1)
