#!/usr/bin/env python3
"""run.py: benchmark and serve a deploykit device bundle, with no deploykit installed.

    python3 run.py verify                                         every file against bundle.json (sha256)
    python3 run.py bench --backend tensorrt --out results.json    teacher vs student UNet steps, interleaved
    python3 run.py bench --backend onnxruntime-cpu --out results.json   the same on the CPU (the stand-in)
    python3 run.py serve --port 8000                              the student over HTTP (POST /generate)

Needs numpy and Pillow (JetPack: python3-numpy, python3-pil; ``verify`` checks both), and for ``--backend
tensorrt`` TensorRT's Python bindings (JetPack: python3-libnvinfer) and torch with CUDA for the device buffers
(JetPack's torch wheel); for ``--backend onnxruntime-cpu`` onnxruntime. The engines come from
``build_engines.sh`` (see README.txt).

This file is ``deploykit/device/scripts/run.py`` in deploykit's source tree, copied into every bundle as it is;
it imports nothing from deploykit, so the device needs only what is named above. It feeds each graph by the
roles bundle.json gives its inputs and outputs (deploykit.models.io_spec's description of the model), not by
their names. Where it repeats a deploykit helper the copy is marked ``# Copied from`` (``utils/check_copies.py``
keeps it equal to its source). Its TensorRT code is written against the TensorRT 10 API and type-checked
against tensorrt-stubs in CI.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import json
import math
import os
import platform
import queue
import re
import secrets
import select
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, replace
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import tensorrt as trt

HERE = Path(__file__).resolve().parent
MANIFEST = "bundle.json"
ENGINES_JSON = "engines/engines.json"
BACKENDS = ("tensorrt", "onnxruntime-cpu")
FORMAT = 2


class BundleError(Exception):
    """A problem with the bundle or this machine, said in one line (exit code 2)."""


# Copied from deploykit.device.scripts.build_engines.log
def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# Copied from deploykit.io.sha256_file
def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def load_manifest(root: Path) -> dict:
    path = root / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except OSError as e:
        raise BundleError(f"{path}: cannot read the bundle manifest ({e})") from None
    except json.JSONDecodeError as e:
        raise BundleError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise BundleError(f"{path}: bundle format {found!r}; this run.py reads format {FORMAT}")
    problems = path_problems(root, manifest)
    if problems:  # a bundle may come from someone else: nothing outside it is read, run or served
        raise BundleError(f"{path} names paths outside the bundle: " + "; ".join(problems[:5]))
    return manifest


def verify(root: Path, manifest: dict) -> list[str]:
    """Every file of the bundle that is missing or whose sha256 differs from bundle.json."""
    problems = []
    for rel, sha in manifest["files"].items():
        path = root / rel
        if not path.is_file():
            problems.append(f"{rel}: missing")
        elif sha256_file(path) != sha:
            problems.append(f"{rel}: sha256 differs from {MANIFEST}")
    return problems


def missing_libraries() -> list[str]:
    """The libraries run.py needs beyond numpy (imported above) that this Python cannot import."""
    try:
        import PIL.Image  # noqa: F401
    except ImportError:
        return ["Pillow, which writes the served PNGs (JetPack: sudo apt install python3-pil; else pip3 install pillow)"]
    return []


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
# the machine


def _read(path: str) -> str | None:
    try:
        with open(path, "rb") as f:
            return f.read().replace(b"\x00", b"").decode(errors="replace").strip() or None
    except OSError:
        return None


def cpu_name() -> str:
    text = _read("/proc/cpuinfo") or ""
    for line in text.splitlines():
        if line.lower().startswith(("model name", "hardware", "cpu model")):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def device_info() -> dict:
    """What the figures were measured on: the board (/proc/device-tree/model on a Jetson), CPU, L4T release."""
    info: dict[str, Any] = {"model": _read("/proc/device-tree/model"), "cpu": cpu_name(), "machine": platform.machine(),
                            "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
                            "python": platform.python_version(), "numpy": np.__version__}
    release = _read("/etc/nv_tegra_release")
    if release:
        info["l4t"] = release.splitlines()[0]
    info["name"] = info["model"] or info["cpu"]
    return info


# Copied from deploykit.device.scripts.build_engines.gpu_label
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


# ----------------------------------------------------------------------------------------------
# models: ONNX Runtime (the CPU stand-in) and TensorRT, one interface


class OnnxRuntimeModel:
    """An ONNX graph in ONNX Runtime on the CPU."""

    def __init__(self, path: Path) -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise BundleError("--backend onnxruntime-cpu needs onnxruntime (pip install onnxruntime)") from None
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        # idle threads do not spin, as in deploykit.runtime.backends.ort_session_options: timed round-robin,
        # the idle sessions would take cores from the one being timed
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        types = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
                 "tensor(int64)": np.int64, "tensor(int32)": np.int32}
        self.dtypes = {i.name: np.dtype(types.get(i.type, np.float32)) for i in self.session.get_inputs()}
        self.outputs = [o.name for o in self.session.get_outputs()]

    def bind(self, feeds: dict[str, np.ndarray]) -> Callable[[], None]:
        """A call that runs the model once on ``feeds`` (for timing)."""
        cast = {n: np.array(feeds[n], dtype=d, order="C") for n, d in self.dtypes.items()}
        session = self.session

        def run() -> None:
            session.run(None, cast)
        return run

    def __call__(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        cast = {n: np.array(feeds[n], dtype=d, order="C") for n, d in self.dtypes.items()}
        return dict(zip(self.outputs, self.session.run(None, cast)))


class TensorRTModel:
    """A serialized TensorRT engine (TensorRT 10 API), its buffers on the GPU through torch."""

    def __init__(self, path: Path) -> None:
        try:
            import tensorrt as trt
        except ImportError:
            raise BundleError("--backend tensorrt needs TensorRT's Python bindings (JetPack: sudo apt install "
                              "python3-libnvinfer; or use the docker/Dockerfile.jetson bundle-runner image)") from None
        if not hasattr(trt, "Runtime"):  # tensorrt-stubs alone: a folder of .pyi files that imports as a namespace
            raise BundleError("--backend tensorrt: `tensorrt` here is not TensorRT (type stubs only?); install TensorRT's "
                              "Python bindings (JetPack: python3-libnvinfer)")
        try:
            import torch
        except ImportError:
            raise BundleError("--backend tensorrt keeps its buffers on the GPU with torch: install JetPack's torch wheel "
                              "(see README.txt)") from None
        if not torch.cuda.is_available():
            raise BundleError("--backend tensorrt: torch sees no CUDA device (a CPU-only torch wheel?)")
        self.torch = torch
        self.logger = trt.Logger(trt.Logger.Severity.WARNING)
        self.runtime = trt.Runtime(self.logger)
        engine = self.runtime.deserialize_cuda_engine(path.read_bytes())
        if engine is None:
            raise BundleError(f"{path}: TensorRT could not deserialize the engine (built with another TensorRT version "
                              "or for another GPU? run build_engines.sh --force)")
        self.engine = engine
        self.context = engine.create_execution_context()
        self.stream = torch.cuda.Stream()
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.dtypes = {n: np.dtype(trt.nptype(engine.get_tensor_dtype(n))) for n in names}

    def _torch_dtype(self, dtype: np.dtype) -> Any:
        return self.torch.from_numpy(np.empty(0, dtype=dtype)).dtype

    def _bind(self, feeds: dict[str, np.ndarray]) -> tuple[Callable[[], None], dict[str, Any]]:
        torch = self.torch
        keep: dict[str, Any] = {}
        for name in self.inputs:
            array = np.array(feeds[name], dtype=self.dtypes[name], order="C")
            tensor = torch.from_numpy(array).to("cuda")
            keep[name] = tensor
            if not self.context.set_input_shape(name, tuple(array.shape)):
                raise BundleError(f"input {name}: shape {list(array.shape)} is outside the engine's optimization profile")
            self.context.set_tensor_address(name, tensor.data_ptr())
        outputs: dict[str, Any] = {}
        for name in self.outputs:
            dims = self.context.get_tensor_shape(name)
            shape = tuple(dims[i] for i in range(len(dims)))
            outputs[name] = torch.empty(shape, dtype=self._torch_dtype(self.dtypes[name]), device="cuda")
            self.context.set_tensor_address(name, outputs[name].data_ptr())
        torch.cuda.synchronize()  # the copies above ran on torch's stream; the engine runs on its own
        return _BoundEngine(self.context, self.stream, {**keep, **outputs}), outputs

    def bind(self, feeds: dict[str, np.ndarray]) -> Callable[[], None]:
        return self._bind(feeds)[0]

    def __call__(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        run, outputs = self._bind(feeds)
        run()
        return {name: t.float().cpu().numpy() for name, t in outputs.items()}


class _BoundEngine:
    """One engine call on buffers already in place; holds them for as long as it can run."""

    def __init__(self, context: trt.IExecutionContext, stream: Any, buffers: dict[str, Any]) -> None:
        self.context, self.stream, self.buffers = context, stream, buffers

    def __call__(self) -> None:
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise RuntimeError("TensorRT execute_async_v3 failed")
        self.stream.synchronize()


Model = Any  # OnnxRuntimeModel | TensorRTModel


def engine_table(root: Path) -> dict:
    path = root / ENGINES_JSON
    if not path.is_file():
        raise BundleError(f"no TensorRT engines in {root / 'engines'}: run `sh build_engines.sh` on this device first")
    try:
        table = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise BundleError(f"{path}: cannot read it ({e}): run `sh build_engines.sh --force`") from None
    if not isinstance(table, dict) or not all(isinstance(e, dict) for e in table.values()):
        raise BundleError(f"{path}: not an engine table: run `sh build_engines.sh --force`")
    return table


def engine_path(root: Path, entry: dict) -> Path:
    """An engines.json entry's engine file, which must be inside the bundle like every path the bundle names."""
    try:
        return inside(root, entry.get("engine"))
    except OutsideFolder as e:
        raise BundleError(f"{root / ENGINES_JSON}: engine {e}") from None


def load_model(root: Path, manifest: dict, component: str, backend: str) -> Model:
    """``component`` is ``teacher/unet``, ``student/unet``, ``student/text_encoder`` or ``student/vae_decoder``."""
    spec = manifest["components"].get(component)
    if spec is None:
        raise BundleError(f"this bundle has no {component} (bundle.json components: {', '.join(manifest['components'])})")
    if backend == "onnxruntime-cpu":
        return OnnxRuntimeModel(root / spec["onnx"])
    if backend != "tensorrt":
        raise BundleError(f"unknown backend {backend!r} (known: {', '.join(BACKENDS)})")
    entry = engine_table(root).get(component)
    if entry is None or not (engine := engine_path(root, entry)).is_file():
        raise BundleError(f"no TensorRT engine for {component}: run `sh build_engines.sh` on this device")
    if entry.get("onnx_sha256") != manifest["files"].get(spec["onnx"]):
        raise BundleError(f"the {component} engine was built from another ONNX graph: run `sh build_engines.sh`")
    return TensorRTModel(engine)


# ----------------------------------------------------------------------------------------------
# bench


def constant_feed(spec: dict, batch: int) -> np.ndarray:
    """An input bundle.json gives a value for (SDXL's time_ids): that row, once per row of the batch."""
    return np.tile(np.asarray(spec["value"], dtype=np.dtype(spec["dtype"])), (batch, 1))


def unet_feeds(manifest: dict, seed: int) -> dict[str, np.ndarray]:
    """One UNet call's inputs at the bundle's bench shape (the same arrays for teacher and student), drawn by role."""
    rng = np.random.default_rng(seed)
    steps = manifest.get("scheduler", {}).get("config", {}).get("num_train_timesteps", 1000)
    feeds = {}
    for spec in manifest["bench"]["inputs"]:
        dtype, shape = np.dtype(spec["dtype"]), tuple(spec["shape"])
        if spec["role"] == "timestep":
            feeds[spec["name"]] = np.array(rng.integers(0, steps, size=shape) if shape else rng.integers(0, steps), dtype=dtype)
        elif "value" in spec:
            feeds[spec["name"]] = constant_feed(spec, shape[0])
        elif np.issubdtype(dtype, np.floating):
            feeds[spec["name"]] = rng.standard_normal(shape).astype(dtype)
        else:
            feeds[spec["name"]] = rng.integers(0, 100, size=shape).astype(dtype)
    return feeds


def latency(times: list[float]) -> dict:
    ms = np.asarray(times) * 1e3
    return {"p50_ms": float(np.percentile(ms, 50)), "p90_ms": float(np.percentile(ms, 90)), "mean_ms": float(ms.mean()),
            "min_ms": float(ms.min()), "runs": len(times)}


def measure_pair(teacher: Callable[[], None], student: Callable[[], None], warmup: int, runs: int) -> dict:
    """Warm both up, then ``runs`` pairs, alternating which goes first (as deploykit.bench.measure_pair)."""
    for _ in range(warmup):
        teacher()
        student()
    t_times: list[float] = []
    s_times: list[float] = []
    for i in range(runs):
        order = [(teacher, t_times), (student, s_times)]
        for fn, times in (order if i % 2 == 0 else order[::-1]):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        if (i + 1) % max(1, runs // 5) == 0:
            log(f"  {i + 1}/{runs} pairs")
    t, s = latency(t_times), latency(s_times)
    return {"teacher": t, "student": s, "speedup": t["p50_ms"] / s["p50_ms"],
            "speedup_pair_median": statistics.median(a / b for a, b in zip(t_times, s_times))}


def _versions(backend: str) -> dict:
    out = {"python": platform.python_version(), "numpy": np.__version__}
    try:
        if backend == "tensorrt":
            import tensorrt as trt
            import torch

            out["tensorrt"] = str(trt.__version__)
            out["torch"] = str(torch.__version__)
        else:
            import onnxruntime as ort

            out["onnxruntime"] = str(ort.__version__)
    except ImportError:
        pass
    return out


def bench(root: Path, manifest: dict, backend: str, warmup: int, runs: int, seed: int) -> dict:
    problems = verify(root, manifest)
    if problems:
        raise BundleError("the bundle does not match bundle.json (copy it again): " + "; ".join(problems[:5]))
    models = {role: load_model(root, manifest, f"{role}/unet", backend) for role in ("teacher", "student")}
    feeds = unet_feeds(manifest, seed)
    calls = {role: m.bind(feeds) for role, m in models.items()}
    sample = next(spec["name"] for spec in manifest["bench"]["inputs"] if spec["role"] == "sample")
    shape = list(feeds[sample].shape)
    log(f"{backend}: teacher vs student UNet, input {'x'.join(map(str, shape))}, {warmup} warm-up and {runs} timed pairs")
    started = time.time()
    pair = measure_pair(calls["teacher"], calls["student"], warmup, runs)
    result = {
        "format": FORMAT,
        "backend": backend,
        "precision": (engine_precision(root, manifest) if backend == "tensorrt"
                      else manifest["bench"].get("onnx_precision", "fp32")),
        "device": device_info(),
        "bundle_sha256": sha256_file(root / MANIFEST),
        "recipe": manifest.get("recipe"),
        "target": manifest.get("target"),
        "shape": shape,
        "warmup": warmup,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "seconds": round(time.time() - started, 2),
        "versions": _versions(backend),
        **pair,
    }
    if backend == "tensorrt":
        result["device"]["gpu"] = gpu_label()
        table = engine_table(root)
        result["engines"] = {c: {k: v for k, v in e.items() if k != "sparse_lines"} for c, e in table.items()
                             if c.endswith("/unet")}
    log(f"{backend}: teacher p50 {pair['teacher']['p50_ms']:.2f} ms, student p50 {pair['student']['p50_ms']:.2f} ms "
        f"-> {pair['speedup']:.2f}x (median of per-pair ratios {pair['speedup_pair_median']:.2f}x) on {result['device']['name']}")
    return result


def engine_precision(root: Path, manifest: dict) -> str:
    table = engine_table(root)
    return "/".join(sorted({table[f"{r}/unet"]["precision"] for r in ("teacher", "student") if f"{r}/unet" in table}))


# ----------------------------------------------------------------------------------------------
# sampling: a CLIP tokenizer, DDIM, and the pipeline (numpy only)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP's reversible byte -> printable character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def _is_cjk(cp: int) -> bool:
    return any(lo <= cp <= hi for lo, hi in ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F),
                                             (0x2B740, 0x2B81F), (0x2B820, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F)))


class ClipTokenizer:
    """CLIP's byte-level BPE tokenizer from a saved tokenizer folder (vocab.json, merges.txt), as transformers'
    CLIPTokenizer runs without ftfy: control characters dropped, whitespace collapsed, lower case, CJK
    characters split, then BPE. Padded / truncated to ``model_max_length`` (77)."""

    PATTERN = re.compile(r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[^\W\d_]+|\d|(?:[^\s\w]|_)+",
                         re.IGNORECASE)

    def __init__(self, folder: Path) -> None:
        self.vocab: dict[str, int] = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
        merges = (folder / "merges.txt").read_text(encoding="utf-8").strip().split("\n")[1:49152 - 256 - 2 + 1]
        self.ranks = {tuple(m.split()): i for i, m in enumerate(merges) if len(m.split()) == 2}
        config: dict = {}
        for name in ("tokenizer_config.json", "special_tokens_map.json"):
            if (folder / name).is_file():
                config.update(json.loads((folder / name).read_text()))

        def token(key: str, default: str) -> str:
            value = config.get(key, default)
            return value.get("content", default) if isinstance(value, dict) else value

        self.max_length = int(config.get("model_max_length", 77))
        if self.max_length > 1024:  # transformers' "no limit" sentinel
            self.max_length = 77
        self.bos = self.vocab[token("bos_token", "<|startoftext|>")]
        self.eos = self.vocab[token("eos_token", "<|endoftext|>")]
        self.pad = self.vocab[token("pad_token", "<|endoftext|>")]
        self.unk = self.vocab[token("unk_token", "<|endoftext|>")]
        self.byte_encoder = bytes_to_unicode()
        self.cache: dict[str, str] = {}

    @staticmethod
    def clean(text: str) -> str:
        chars = []
        for ch in text:
            cp = ord(ch)
            if cp == 0 or cp == 0xFFFD:
                continue
            if ch in "\t\n\r" or ch.isspace():
                chars.append(" ")
            elif ch.isprintable() or ch == " ":
                chars.append(f" {ch} " if _is_cjk(cp) else ch)
        return " ".join("".join(chars).lower().split())

    def bpe(self, token: str) -> str:
        if token in self.cache:
            return self.cache[token]
        word = tuple(token[:-1]) + (token[-1] + "</w>",)
        while len(word) > 1:
            pairs = {(a, b) for a, b in zip(word, word[1:])}
            best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            if best not in self.ranks:
                break
            merged: list[str] = []
            i = 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = tuple(merged)
        out = " ".join(word)
        self.cache[token] = out
        return out

    def encode(self, text: str) -> list[int]:
        ids = []
        for piece in self.PATTERN.findall(self.clean(text)):
            mapped = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
            ids += [self.vocab.get(t, self.unk) for t in self.bpe(mapped).split(" ")]
        ids = [self.bos] + ids[:self.max_length - 2] + [self.eos]
        return ids + [self.pad] * (self.max_length - len(ids))

    def __call__(self, prompts: list[str]) -> np.ndarray:
        return np.array([self.encode(p) for p in prompts], dtype=np.int64)


class DDIM:
    """diffusers' DDIMScheduler (eta 0) in numpy, from a scheduler config."""

    def __init__(self, config: dict, clip_sample: bool, set_alpha_to_one: bool) -> None:
        self.train_steps = int(config.get("num_train_timesteps", 1000))
        start, end = float(config.get("beta_start", 0.0001)), float(config.get("beta_end", 0.02))
        schedule = config.get("beta_schedule", "linear")
        if config.get("trained_betas"):
            betas = np.asarray(config["trained_betas"], dtype=np.float32)
        elif schedule == "linear":
            betas = np.linspace(start, end, self.train_steps, dtype=np.float32)
        elif schedule == "scaled_linear":
            betas = np.linspace(start ** 0.5, end ** 0.5, self.train_steps, dtype=np.float32) ** 2
        elif schedule == "squaredcos_cap_v2":
            def alpha_bar(t: float) -> float:
                return float(np.cos((t + 0.008) / 1.008 * np.pi / 2) ** 2)
            betas = np.array([min(1 - alpha_bar((i + 1) / self.train_steps) / alpha_bar(i / self.train_steps), 0.999)
                              for i in range(self.train_steps)], dtype=np.float32)
        else:
            raise BundleError(f"scheduler: beta_schedule {schedule!r} is not supported by run.py")
        self.alphas_cumprod = np.cumprod(1.0 - betas, axis=0).astype(np.float32)
        self.final_alpha = np.float32(1.0) if set_alpha_to_one else self.alphas_cumprod[0]
        self.prediction = config.get("prediction_type", "epsilon")
        self.offset = int(config.get("steps_offset", 0))
        self.spacing = config.get("timestep_spacing", "leading")
        self.clip_sample = clip_sample
        self.clip_range = float(config.get("clip_sample_range", 1.0))
        self.steps = 0

    def timesteps(self, steps: int) -> np.ndarray:
        self.steps = steps
        if self.spacing == "linspace":
            return np.linspace(0, self.train_steps - 1, steps).round()[::-1].copy().astype(np.int64)
        if self.spacing == "trailing":
            return np.round(np.arange(self.train_steps, 0, -self.train_steps / steps)).astype(np.int64) - 1
        ratio = self.train_steps // steps
        return (np.arange(0, steps) * ratio).round()[::-1].copy().astype(np.int64) + self.offset

    def step(self, model_output: np.ndarray, t: int, x: np.ndarray) -> np.ndarray:
        prev = t - self.train_steps // self.steps
        a_t = self.alphas_cumprod[t]
        a_prev = self.alphas_cumprod[prev] if prev >= 0 else self.final_alpha
        if self.prediction == "epsilon":
            x0 = (x - np.sqrt(1 - a_t) * model_output) / np.sqrt(a_t)
            eps = model_output
        elif self.prediction == "sample":
            x0 = model_output
            eps = (x - np.sqrt(a_t) * x0) / np.sqrt(1 - a_t)
        elif self.prediction == "v_prediction":
            x0 = np.sqrt(a_t) * x - np.sqrt(1 - a_t) * model_output
            eps = np.sqrt(a_t) * model_output + np.sqrt(1 - a_t) * x
        else:
            raise BundleError(f"scheduler: prediction_type {self.prediction!r} is not supported by run.py")
        if self.clip_sample:
            x0 = np.clip(x0, -self.clip_range, self.clip_range)
        return (np.sqrt(a_prev) * x0 + np.sqrt(1 - a_prev) * eps).astype(np.float32)


class Component:
    """A graph of the bundle, fed and read by the roles bundle.json gives its inputs and outputs."""

    def __init__(self, root: Path, manifest: dict, name: str, backend: str) -> None:
        self.model = load_model(root, manifest, name, backend)
        spec = manifest["components"][name]
        self.inputs = {t["role"]: t for t in spec["inputs"]}
        self.outputs = {t["role"]: t["name"] for t in spec["outputs"]}

    def __call__(self, values: dict[str, np.ndarray], output: str) -> np.ndarray:
        """The output of role ``output`` for the inputs of the roles in ``values`` (and the bundle's constants)."""
        batch = next(iter(values.values())).shape[0]
        feeds = {self.inputs[role]["name"]: x for role, x in values.items()}
        feeds.update({t["name"]: constant_feed(t, batch) for t in self.inputs.values() if "value" in t})
        return self.model(feeds)[self.outputs[output]].astype(np.float32)

    def timestep(self, t: int, batch: int) -> np.ndarray:
        """``t`` as this UNet takes it: one value for the batch (a 0-d input) or one per row."""
        spec = self.inputs["timestep"]
        dtype = np.dtype(spec["dtype"])
        return np.array(t, dtype=dtype) if not spec["shape"] else np.full((batch,), t, dtype=dtype)


class Generator:
    """The student, sampled with DDIM: a Stable Diffusion pipeline (tokenizer, text encoder, UNet with
    classifier-free guidance, VAE decoder) or a pixel-space UNet."""

    def __init__(self, root: Path, manifest: dict, backend: str) -> None:
        self.manifest, self.backend = manifest, backend
        self.kind = manifest["kind"]
        sched = manifest["scheduler"]
        self.scheduler_args = (sched["config"], bool(sched["clip_sample"]), bool(sched["set_alpha_to_one"]))
        self.unet = Component(root, manifest, "student/unet", backend)
        self.sample_shape = self.unet.inputs["sample"]["shape"][1:]  # (C, h, w) at the bundle's resolution
        self.size = manifest.get("resolution") or self.sample_shape[-1]
        if self.kind == "sd":
            pipe = manifest.get("pipeline")
            if not pipe:
                raise BundleError("this bundle ships the UNets only (bundle.pipeline: false): it benchmarks, it does not "
                                  "make images")
            self.tokenizer = ClipTokenizer(root / pipe["tokenizer"])
            self.text_encoder = Component(root, manifest, "student/text_encoder", backend)
            self.vae_decoder = Component(root, manifest, "student/vae_decoder", backend)
            self.scaling_factor = float(pipe["vae_scaling_factor"])
        elif self.kind != "pixel":
            raise BundleError(f"run.py serve makes images of SD 1.x/2.x and pixel UNets, not {self.kind}")

    def _unet(self, x: np.ndarray, t: int, hidden: np.ndarray | None) -> np.ndarray:
        values = {"sample": x, "timestep": self.unet.timestep(t, x.shape[0])}
        if hidden is not None:
            values["text"] = hidden
        return self.unet(values, "noise")

    def noise(self, seed: int, images: int = 1) -> np.ndarray:
        """The starting noise of ``images`` images drawn from ``seed``, (images, C, h, w): the first image's is
        the same however many are drawn, so a seed gives the same first image for any ``num_images``."""
        return np.random.default_rng(seed).standard_normal((images, *self.sample_shape)).astype(np.float32)

    def generate(self, prompt: str, negative_prompt: str, steps: int, guidance_scale: float, seed: int,
                 noise: np.ndarray | None = None) -> np.ndarray:
        """One image, HWC uint8, from ``noise`` (1, C, h, w) or noise drawn from ``seed``."""
        scheduler = DDIM(*self.scheduler_args)
        x = np.asarray(self.noise(seed) if noise is None else noise, dtype=np.float32)
        hidden = None
        guided = self.kind == "sd" and guidance_scale > 1.0
        if self.kind == "sd":
            ids = self.tokenizer([negative_prompt, prompt] if guided else [prompt])
            hidden = self.text_encoder({"tokens": ids}, "text")
        for t in scheduler.timesteps(steps):
            x_in = np.concatenate([x, x]) if guided else x
            eps = self._unet(x_in, int(t), hidden)
            if guided:
                uncond, cond = eps[:1], eps[1:]
                eps = uncond + guidance_scale * (cond - uncond)
            x = scheduler.step(eps, int(t), x)
        if self.kind == "sd":
            x = self.vae_decoder({"latent": x / self.scaling_factor}, "image")
        pixels = np.clip((x[0] + 1) * 127.5, 0, 255).round().astype(np.uint8)
        return pixels.transpose(1, 2, 0)


def png_bytes(image: np.ndarray) -> bytes:
    """An 8-bit grey (H, W, 1) or RGB (H, W, 3) image as PNG."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buffer, format="PNG")
    return buffer.getvalue()


# ----------------------------------------------------------------------------------------------
# serve: deploykit serve's POST /generate contract (docs/serving.md in deploykit's source tree), with the
# standard library alone: the same fields, types, limits, status codes, headers and response formats, and
# one test module runs the same cases against both servers. What differs is what the model here can do:
# images at the engines' one size, one scheduler (ddim), one request at a time (no batching).


# Copied from deploykit.runtime.pipeline.MAX_SEED
MAX_SEED = 2**32 - 1

# Copied from deploykit.runtime.pipeline.SCHEDULERS
SCHEDULERS = ("ddim", "dpm-solver++", "euler")

SAMPLES_WITH = ("ddim",)  # of the contract's schedulers, those run.py runs; /health lists them
MAX_JSON_DEPTH = 200  # nesting deploykit serve's JSON parser reads; deeper is not JSON to either server
LINGER_S = 1.0  # after answering, how long a connection is drained before it closes (see BoundedHTTPServer)
ROUTES = {"/generate": "POST", "/health": "GET"}


# Copied from deploykit.serve.schema.ServeConfig
@dataclass(frozen=True)
class ServeConfig:
    max_batch: int = 4           # images per model call; 1 turns batching off
    max_wait_ms: float = 10.0    # how long the oldest waiting request may wait for others to join its batch
    queue_size: int = 16         # requests waiting (beyond the batch being run); more get 503
    timeout_s: float = 60.0      # per request, queueing included; past it, 504
    max_steps: int = 100
    max_side: int = 1024         # pixels, height and width each
    max_prompt_chars: int = 1000  # CLIP reads 77 tokens; this bounds the tokenizer's work, not the model's
    max_images: int = 4          # per request
    max_body_bytes: int = 16 * 1024
    # height x width x steps x images, per request: what one request may cost however its fields combine.
    # None: the largest request at the artifact's own size (see pixel_step_budget)
    max_pixel_steps: int | None = None
    read_timeout_s: float = 10.0  # to send a request's headers, and again its body; past it, dropped / 408
    warmup: bool = True          # one tiny generation before serving: the first call pays the kernels' set-up

    def __post_init__(self):
        for name in ("max_batch", "queue_size", "max_steps", "max_side", "max_prompt_chars", "max_images",
                     "max_body_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.max_pixel_steps is not None and self.max_pixel_steps < 1:
            raise ValueError("max_pixel_steps must be at least 1")
        if self.max_wait_ms < 0 or self.timeout_s <= 0 or self.read_timeout_s <= 0:
            raise ValueError("max_wait_ms must be at least 0, timeout_s and read_timeout_s above 0")

    def pixel_step_budget(self, side: int) -> int:
        """The per-request compute cap for a model whose own images are ``side`` x ``side``."""
        if self.max_pixel_steps is not None:
            return self.max_pixel_steps
        return side * side * self.max_steps * self.max_images


@dataclass(frozen=True)
class GenerateRequest:
    """A POST /generate body: the fields and defaults of deploykit serve's GenerateBody."""

    prompt: str | None = None
    negative_prompt: str | None = None
    steps: int = 20
    guidance_scale: float = 7.5
    seed: int | None = None
    scheduler: str = "ddim"
    height: int | None = None
    width: int | None = None
    num_images: int = 1
    format: str = "png"


class Refusal(Exception):
    """An answer other than images: its status, its message, the fields at fault and any headers."""

    def __init__(self, status: int, error: str, fields: dict[str, str] | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(error)
        self.status, self.error, self.fields, self.headers = status, error, fields or {}, headers or {}

    def body(self) -> dict:
        return {"error": self.error, **({"fields": self.fields} if self.fields else {})}


class ClientGone(Exception):
    """The client closed its connection before its request was answered: there is no one to answer."""


def invalid(fields: dict[str, str]) -> Refusal:
    """422 naming each field at fault: ``{"error": "steps: ...", "fields": {"steps": "..."}}``."""
    return Refusal(422, "; ".join(f"{name}: {message}" for name, message in fields.items()), fields)


def _nesting_over(text: str, limit: int) -> bool:
    """Whether the arrays and objects of JSON ``text`` nest deeper than ``limit`` (brackets in strings aside)."""
    depth, in_string, escaped = 0, False, False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            if depth > limit:
                return True
        elif ch in "]}":
            depth -= 1
    return False


def parse_json(raw: bytes) -> object:
    """The body as deploykit serve's parser reads JSON: UTF-8 only (no BOM), no lone surrogate escapes, at most
    MAX_JSON_DEPTH levels deep (Python's own parser would recurse until it failed); anything else is a 400."""
    try:
        text = raw.decode("utf-8")
        if _nesting_over(text, MAX_JSON_DEPTH):
            raise ValueError(f"nested deeper than {MAX_JSON_DEPTH} levels")
        value = json.loads(text)
        json.dumps(value, ensure_ascii=False).encode("utf-8")  # a lone surrogate ("\ud800") cannot be encoded
    except (ValueError, RecursionError) as e:  # UnicodeError and JSONDecodeError are ValueErrors
        raise Refusal(400, f"the body is not valid JSON ({str(e)[:200]})") from None
    return value


def _text(value: object, limits: ServeConfig) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        return "Input should be a valid string"
    if len(value) > min(limits.max_prompt_chars, 100_000):
        return f"at most {limits.max_prompt_chars} characters on this server (got {len(value)})"
    return None


def _integer(value: object, low: int, high: int, limit: int | None = None, unit: str = "", multiple: int = 1) -> str | None:
    """A strict integer (not a bool, not 2.0) from ``low`` to ``high``, a multiple of ``multiple``, then at
    most this server's ``limit``."""
    if not isinstance(value, int) or isinstance(value, bool):
        return "Input should be a valid integer"
    if not low <= value <= high:
        return f"Input should be from {low} to {high}"
    if value % multiple:
        return f"Input should be a multiple of {multiple}"
    if limit is not None and value > limit:
        return f"at most {limit}{unit} on this server"
    return None


def _guidance(value: object, limits: ServeConfig) -> str | None:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return "Input should be a valid number"
    return None if 0 <= value <= 50 else "Input should be a number from 0 to 50"


# each field's check (deploykit.serve.schema.GenerateBody's strict types, bounds and server limits): a message, or None
FIELDS: dict[str, Callable[[object, ServeConfig], str | None]] = {
    "prompt": _text,
    "negative_prompt": _text,
    "steps": lambda v, limits: _integer(v, 1, 10_000, limits.max_steps),
    "guidance_scale": _guidance,
    "seed": lambda v, limits: None if v is None else _integer(v, 0, MAX_SEED),
    "scheduler": lambda v, limits: None if v in SCHEDULERS else "Input should be " + " or ".join(map(repr, SCHEDULERS)),
    "height": lambda v, limits: None if v is None else _integer(v, 8, 16_384, limits.max_side, " pixels", multiple=8),
    "width": lambda v, limits: None if v is None else _integer(v, 8, 16_384, limits.max_side, " pixels", multiple=8),
    "num_images": lambda v, limits: _integer(v, 1, 1024, limits.max_images, " per request"),
    "format": lambda v, limits: None if v in ("png", "base64") else "Input should be 'png' or 'base64'",
}


def check_body(body: object, limits: ServeConfig) -> GenerateRequest:
    """The request a JSON body asks for, every field at fault named at once (422). Defaults are held to the
    server's limits too: 20 steps on a --max-steps 10 server is refused, naming steps, as deploykit serve does."""
    if not isinstance(body, dict):
        raise invalid({"body": "must be a JSON object"})
    defaults = GenerateRequest()
    values = {name: body.get(name, getattr(defaults, name)) for name in FIELDS}
    errors = {name: message for name, check in FIELDS.items() if (message := check(values[name], limits))}
    errors.update({name: "unknown field" for name in body if name not in FIELDS})
    if errors:
        raise invalid(errors)
    return GenerateRequest(**values)


def prepare(request: GenerateRequest, kind: str, size: int) -> GenerateRequest:
    """``request`` as this model runs it (defaults resolved, a seed drawn), or 422 for what it cannot make."""
    if request.format == "png" and request.num_images > 1:
        raise invalid({"format": "png returns one image; use base64 for num_images > 1"})
    if kind == "pixel":
        for name in ("prompt", "negative_prompt"):
            if getattr(request, name) is not None:
                raise invalid({name: "this model is an unconditional pixel-space UNet; it takes no prompt"})
    elif request.prompt is None:
        raise invalid({"prompt": "required: this model is a text-to-image model"})
    if request.scheduler not in SAMPLES_WITH:
        raise invalid({"scheduler": f"this server samples with {' or '.join(SAMPLES_WITH)} only"})
    for name in ("height", "width"):
        if getattr(request, name) not in (None, size):
            raise invalid({name: f"this server makes {size}x{size} images only (its engines' size)"})
    return replace(request, seed=secrets.randbelow(MAX_SEED + 1) if request.seed is None else request.seed,
                   height=size, width=size, negative_prompt=request.negative_prompt or "",
                   guidance_scale=1.0 if kind == "pixel" else float(request.guidance_scale))


def check_budget(request: GenerateRequest, size: int, budget: int) -> None:
    """422 before any work for a request whose height x width x steps x images is over the server's budget."""
    cost = size * size * request.steps * request.num_images
    if cost > budget:
        raise invalid({"body": f"{size}x{size} pixels x {request.steps} steps x {request.num_images} images = "
                               f"{cost:,} pixel-steps, over this server's limit of {budget:,} per request (max_pixel_steps)"})


class QueueFull(Exception):
    """``queue_size`` requests wait for the model already."""


class Expired(Exception):
    """The request's deadline passed before the model got to it; it was not run."""


class ModelWorker:
    """One thread runs the model, one request at a time, and at most ``queue_size`` requests wait for it
    (deploykit serve's batcher, with batches of one). A request whose deadline passed or whose client left
    before its turn is dropped unrun; one already running runs to its end (the model cannot stop mid-way)."""

    def __init__(self, queue_size: int) -> None:
        self.queue_size = queue_size
        self.waiting = 0
        self.busy = False
        self.last_seconds = 1.0  # the last generation's time: what Retry-After is estimated from
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="run.py-model")

    def submit(self, work: Callable[[], Any], deadline: float, wanted: Callable[[], bool]) -> Future:
        """Queue ``work``; raises QueueFull. ``wanted()`` says, when its turn comes, whether anyone still waits."""
        def run() -> Any:
            with self._lock:
                self.waiting -= 1
            if time.monotonic() >= deadline:
                raise Expired()
            if not wanted():
                raise ClientGone()
            self.busy = True
            started = time.perf_counter()
            try:
                return work()
            finally:
                self.last_seconds = time.perf_counter() - started
                self.busy = False

        with self._lock:
            if self.waiting >= self.queue_size:
                raise QueueFull()
            self.waiting += 1
        try:
            future = self._pool.submit(run)
        except RuntimeError:  # shut down
            with self._lock:
                self.waiting -= 1
            raise
        future.add_done_callback(self._cancelled)
        return future

    def _cancelled(self, future: Future) -> None:
        if future.cancelled():  # dropped before it started, so run() never counted it out
            with self._lock:
                self.waiting -= 1

    def retry_after(self) -> int:
        """Seconds until a full queue has likely drained: each waiting request and the running one, at the last one's pace."""
        return max(1, math.ceil(self.last_seconds * (self.queue_size + 1)))

    def stop(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


@dataclass
class Service:
    """What the HTTP handlers share: the model, the server's limits and the worker that runs the model."""

    generator: Generator
    limits: ServeConfig
    worker: ModelWorker

    @property
    def budget(self) -> int:
        return self.limits.pixel_step_budget(self.generator.size)

    def health(self) -> dict:
        g = self.generator
        return {"status": "ok", "recipe": g.manifest.get("recipe"), "kind": g.kind, "backend": g.backend,
                "height": g.size, "width": g.size, "schedulers": list(SAMPLES_WITH), "queue_depth": self.worker.waiting,
                "queue_size": self.limits.queue_size, "max_batch": 1, "busy": self.worker.busy,
                "max_pixel_steps": self.budget}

    def images(self, request: GenerateRequest) -> list[bytes]:
        """The PNGs of a prepared request (on the worker's thread); image i starts from row i of the seed's noise."""
        assert request.seed is not None
        noise = self.generator.noise(request.seed, request.num_images)
        return [png_bytes(self.generator.generate(request.prompt or "", request.negative_prompt or "", request.steps,
                                                  request.guidance_scale, request.seed, noise=noise[i:i + 1]))
                for i in range(request.num_images)]


class DeadlineReader(io.RawIOBase):
    """A connection's socket as a raw stream whose reads fail with TimeoutError once its deadline has passed:
    a total time for a request's headers, and again for its body, where a timeout per read would let a client
    that trickles a byte at a time hold its connection for ever."""

    def __init__(self, sock: socket.socket, seconds: float) -> None:
        super().__init__()
        self.sock, self.seconds = sock, seconds
        self.deadline = time.monotonic() + seconds

    def restart(self) -> None:
        self.deadline = time.monotonic() + self.seconds

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"not received within {self.seconds:g} s")
        self.sock.settimeout(left)
        try:
            return self.sock.recv_into(buffer)
        except ConnectionResetError:
            return 0


def read_chunked(rfile: io.BufferedIOBase, limit: int) -> bytes:
    """A ``Transfer-Encoding: chunked`` body of at most ``limit`` bytes; chunk extensions and trailers dropped.
    Raises Refusal (400 malformed, 413 over the limit) or ClientGone (the connection ended first)."""
    body = bytearray()
    while True:
        line = rfile.readline(1024)
        if not line.endswith(b"\r\n"):
            if line.endswith(b"\n") or len(line) == 1024:
                raise Refusal(400, "malformed chunked body: a chunk size line")
            raise ClientGone()  # the connection ended mid-line
        size = line[:-2].split(b";", 1)[0].strip(b" \t")
        if not re.fullmatch(rb"[0-9A-Fa-f]{1,16}", size):
            raise Refusal(400, "malformed chunked body: a chunk size is not hexadecimal")
        n = int(size, 16)
        if n == 0:
            break
        if len(body) + n > limit:
            raise Refusal(413, f"request body over {limit} bytes")
        data = rfile.read(n + 2)
        if len(data) < n + 2:
            raise ClientGone()
        if data[n:] != b"\r\n":
            raise Refusal(400, "malformed chunked body: a chunk is longer than its size")
        body += data[:n]
    for _ in range(100):  # trailers, up to the blank line
        line = rfile.readline(8192)
        if line == b"\r\n":
            return bytes(body)
        if not line.endswith(b"\r\n"):
            raise ClientGone() if not line else Refusal(400, "malformed chunked body: a trailer")
    raise Refusal(400, "malformed chunked body: too many trailers")


def _printable(text: str) -> str:
    """A line for the log with what a client sent shown, not interpreted (no terminal escapes, no line breaks)."""
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text)


class Handler(BaseHTTPRequestHandler):
    """POST /generate and GET /health, one request per connection (HTTP/1.0 framing: the connection closes
    after each answer, so a refused request's unread body never reaches a next one)."""

    server_version = "deploykit-bundle/1"
    service: Service  # set by make_handler

    def setup(self) -> None:
        super().setup()
        self.rfile.close()  # http.server's own reader: its reference would keep the socket open after close
        self.reader = DeadlineReader(self.connection, self.service.limits.read_timeout_s)
        self.rfile = io.BufferedReader(self.reader)

    def _send(self, status: int, body: bytes, content_type: str, headers: dict[str, str] | None = None) -> None:
        self.connection.settimeout(self.service.limits.read_timeout_s)  # a client that does not read its answer
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if getattr(self, "command", None) != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, obj: dict, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(obj).encode(), "application/json", headers)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own refusals (a malformed request line or header block: 400, 414, 431, 501, 505), as JSON."""
        self.log_error("code %d, message %s", code, message)
        self.close_connection = True
        if self.request_version == "HTTP/0.9":  # what http.server assumes of a request line it could not read
            self.request_version = "HTTP/1.0"  # an answer with a status line, which a client can tell from a body
        self._json(code, {"error": message or HTTPStatus(code).phrase})

    def _dispatch(self) -> None:
        if self.request_version == "HTTP/0.9":
            self.send_error(400, "HTTP/0.9 requests are not served")
            return
        path = urllib.parse.unquote(self.path.split("?", 1)[0])
        try:
            if path not in ROUTES:
                raise Refusal(404, f"no such path: {path[:200]}")
            if self.command != ROUTES[path]:
                raise Refusal(405, f"{path} takes {ROUTES[path]}", headers={"Allow": ROUTES[path]})
            if path == "/health":
                self._json(200, self.service.health())
            else:
                self._generate()
        except Refusal as r:
            self._json(r.status, r.body(), r.headers)
        except ClientGone:
            self.log_message("%s", "the client closed the connection before its answer")

    do_GET = do_POST = do_HEAD = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_TRACE = do_CONNECT = _dispatch

    def _read_body(self) -> bytes:
        """The request's body within read_timeout_s; 400 / 411 / 413 for framing it cannot be read by, 408 late."""
        limit = self.service.limits.max_body_bytes
        declared = self.headers.get_all("Content-Length")
        # equal values listed ("12, 12", or the header twice) are one length (RFC 9110 8.6), as h11 reads them
        lengths = {v.strip() for v in ",".join(declared).split(",")} if declared else set()
        length = lengths.pop() if len(lengths) == 1 else ""
        encodings = ",".join(self.headers.get_all("Transfer-Encoding") or [])
        if encodings:  # read as chunked even beside a Content-Length (RFC 9112 6.3), as deploykit serve does
            if [e.strip().lower() for e in encodings.split(",")] != ["chunked"]:
                raise Refusal(400, "Transfer-Encoding: only chunked is supported")
        elif not declared:
            raise Refusal(411, "a body is required: send Content-Length (or Transfer-Encoding: chunked)")
        elif not (length.isascii() and length.isdigit()):
            raise Refusal(400, "Content-Length must be a non-negative integer")
        elif int(length) > limit:
            raise Refusal(413, f"request body over {limit} bytes")
        self.reader.restart()
        try:
            if encodings:
                return read_chunked(self.rfile, limit)
            body = self.rfile.read(int(length))
        except TimeoutError:
            raise Refusal(408, f"the request body did not arrive within {self.service.limits.read_timeout_s:g} s") from None
        if len(body) < int(length):
            raise ClientGone()
        return body

    def _still_connected(self) -> bool:
        """Whether the client still waits: its socket is not readable, or has bytes rather than end-of-stream."""
        try:
            if not select.select([self.connection], [], [], 0)[0]:
                return True
            return bool(self.connection.recv(1, socket.MSG_PEEK))
        except OSError:
            return False

    def _generate(self) -> None:
        service, limits = self.service, self.service.limits
        request = check_body(parse_json(self._read_body()), limits)
        request = prepare(request, service.generator.kind, service.generator.size)
        check_budget(request, service.generator.size, service.budget)
        deadline = time.monotonic() + limits.timeout_s
        try:
            future = service.worker.submit(lambda: service.images(request), deadline, self._still_connected)
        except QueueFull:
            raise Refusal(503, f"queue full ({limits.queue_size} requests waiting); retry later",
                          headers={"Retry-After": str(service.worker.retry_after())}) from None
        except RuntimeError:
            raise Refusal(503, "the server is stopping") from None
        late = f"timed out after {limits.timeout_s:g} s (queueing included); "
        try:
            images = future.result(timeout=max(0.0, deadline - time.monotonic()))
        except FutureTimeout:
            dropped = future.cancel()  # False once its generation has started: that runs to its end
            raise Refusal(504, late + ("the request was dropped from the queue" if dropped
                                       else "its generation had already started")) from None
        except Expired:  # the worker found it past its deadline before this thread did
            raise Refusal(504, late + "the request was dropped from the queue") from None
        except CancelledError:
            raise Refusal(503, "the server is stopping") from None
        except (ClientGone, Refusal):
            raise
        except Exception as e:  # noqa: BLE001 - the model failed on this request; the server goes on
            raise Refusal(500, f"generation failed: {type(e).__name__}: {e}") from None
        headers = {"X-Seed": str(request.seed), "X-Backend": service.generator.backend}
        if request.format == "png":
            self._send(200, images[0], "image/png", headers)
            return
        self._json(200, {"images": [base64.b64encode(im).decode("ascii") for im in images], "format": "png",
                         "seed": request.seed, "width": request.width, "height": request.height, "steps": request.steps,
                         "scheduler": request.scheduler, "backend": service.generator.backend}, headers)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (http.server's signature)
        log(_printable(f"{self.address_string()} {format % args}"))


def make_handler(service: Service) -> type[Handler]:
    return type("BundleHandler", (Handler,), {"service": service})


BUSY = json.dumps({"error": "too many connections; retry later"}).encode()


class BoundedHTTPServer(HTTPServer):
    """http.server with a fixed pool of ``workers`` handler threads instead of a thread per connection: that
    many connections are served at once and as many again wait for a thread; one more is answered 503 at once.
    Each connection's time is bounded (DeadlineReader, LINGER_S), so a crowd of slow clients delays the others
    for a while, and never holds the server."""

    request_queue_size = 64  # the listen backlog: connections the kernel holds until they are accepted

    def __init__(self, address: tuple[str, int], handler: type[Handler], workers: int) -> None:
        super().__init__(address, handler)
        self.connections: queue.Queue = queue.Queue(workers)
        for i in range(workers):
            threading.Thread(target=self._serve_connections, name=f"run.py-http-{i}", daemon=True).start()

    def process_request(self, request: Any, client_address: Any) -> None:
        try:
            self.connections.put_nowait((request, client_address))
        except queue.Full:
            try:  # from the accepting thread, which must not wait on this client
                request.setblocking(False)
                request.send(b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
                             b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(BUSY), BUSY))
            except OSError:
                pass
            self.close_request(request)

    def _serve_connections(self) -> None:
        while True:
            request, client_address = self.connections.get()
            try:
                self.finish_request(request, client_address)
            except Exception:  # noqa: BLE001 - one connection's failure is logged; the thread goes on
                self.handle_error(request, client_address)
            finally:
                self.shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        error = sys.exc_info()[1]
        if isinstance(error, OSError):  # the client went away mid-answer: nothing wrong here
            log(f"{client_address[0]}: connection lost ({type(error).__name__})")
        else:
            super().handle_error(request, client_address)  # a traceback: a bug worth reporting

    def shutdown_request(self, request: Any) -> None:
        # Close without a reset: a socket closed with unread bytes (a refused request's body) sends a TCP
        # reset, which can destroy the answer before the client reads it. So stop sending, then read and drop
        # what the client still sends, for LINGER_S at most, before closing.
        try:
            request.shutdown(socket.SHUT_WR)
            deadline = time.monotonic() + LINGER_S
            drained = 0
            while drained < 1 << 20 and (left := deadline - time.monotonic()) > 0:
                request.settimeout(left)
                chunk = request.recv(65536)
                if not chunk:
                    break
                drained += len(chunk)
        except OSError:
            pass
        self.close_request(request)


def serve(root: Path, manifest: dict, backend: str, host: str, port: int, limits: ServeConfig, connections: int) -> None:
    problems = verify(root, manifest) + [f"missing {x}" for x in missing_libraries()]
    if problems:
        raise BundleError("cannot serve: " + "; ".join(problems[:5]))
    generator = Generator(root, manifest, backend)
    if limits.warmup:
        generator.generate("warm-up", "", 1, 7.5, 0)
    service = Service(generator, limits, ModelWorker(limits.queue_size))
    server = BoundedHTTPServer((host, port), make_handler(service), connections)
    if host not in ("127.0.0.1", "localhost", "::1"):
        log(f"serving on {host}: reachable from other machines; there is no authentication")
    log(f"serving {manifest.get('recipe')} ({generator.kind}, {backend}) on http://{host}:{server.server_address[1]} "
        "(POST /generate, GET /health)")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        service.worker.stop()


# ----------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="run.py", description="Benchmark and serve a deploykit device bundle.")
    parser.add_argument("--bundle", default=str(HERE), help="the bundle folder (default: this script's)")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("verify", help="check every file against bundle.json, and that numpy and Pillow import")
    p = sub.add_parser("bench", help="time teacher and student UNet steps, interleaved, same inputs")
    p.add_argument("--backend", choices=BACKENDS, default="tensorrt")
    p.add_argument("--out", default="results.json", help="results JSON (default results.json; - for stdout)")
    p.add_argument("--warmup", type=int, help="warm-up pairs (default: bundle.json)")
    p.add_argument("--runs", type=int, help="timed pairs (default: bundle.json)")
    p.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("serve", help="serve the student over HTTP: POST /generate, GET /health")
    p.add_argument("--backend", choices=BACKENDS, default="tensorrt")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    # deploykit serve's options, with its names and defaults (the same contract: docs/serving.md)
    d = ServeConfig()
    p.add_argument("--queue-size", type=int, default=d.queue_size, help=f"waiting requests before 503 (default {d.queue_size})")
    p.add_argument("--timeout-s", type=float, default=d.timeout_s,
                   help=f"per request, queueing included; past it 504 (default {d.timeout_s:g})")
    p.add_argument("--max-steps", type=int, default=d.max_steps)
    p.add_argument("--max-images", type=int, default=d.max_images, help=f"images per request (default {d.max_images})")
    p.add_argument("--max-pixel-steps", type=int, help="compute budget per request: height x width x steps x images "
                                                        "(default: the bundle's size x --max-steps x --max-images)")
    p.add_argument("--read-timeout-s", type=float, default=d.read_timeout_s,
                   help=f"a client's time to send a request's headers, and again its body (default {d.read_timeout_s:g})")
    p.add_argument("--max-body-bytes", type=int, default=d.max_body_bytes)
    p.add_argument("--max-prompt-chars", type=int, default=d.max_prompt_chars)
    p.add_argument("--max-connections", type=int, default=32,
                   help="connections served at once (a thread each); as many more wait, beyond that 503 (default 32)")
    p.add_argument("--no-warmup", action="store_true")
    args = parser.parse_args(argv)
    root = Path(args.bundle).resolve()
    try:
        manifest = load_manifest(root)
        if args.command == "verify":
            problems = verify(root, manifest) + [f"missing {x}" for x in missing_libraries()]
            for p_ in problems:
                log(p_)
            if problems:
                return 2
            log(f"{len(manifest['files'])} files match {MANIFEST}; numpy and Pillow import")
            return 0
        if args.command == "bench":
            warmup = manifest["bench"]["warmup"] if args.warmup is None else args.warmup
            runs = manifest["bench"]["runs"] if args.runs is None else args.runs
            if runs < 1 or warmup < 0:
                raise BundleError("--runs must be at least 1 and --warmup at least 0")
            result = bench(root, manifest, args.backend, warmup, runs, args.seed)
            text = json.dumps(result, indent=2) + "\n"
            if args.out == "-":
                sys.stdout.write(text)
            else:
                atomic_write_text(Path(args.out), text)
            return 0
        try:
            limits = ServeConfig(max_batch=1, queue_size=args.queue_size, timeout_s=args.timeout_s, max_steps=args.max_steps,
                                 max_images=args.max_images, max_pixel_steps=args.max_pixel_steps,
                                 read_timeout_s=args.read_timeout_s, max_body_bytes=args.max_body_bytes,
                                 max_prompt_chars=args.max_prompt_chars, warmup=not args.no_warmup)
        except ValueError as e:
            raise BundleError(f"serve: {e}") from None
        if args.max_connections < 1:
            raise BundleError("serve: --max-connections must be at least 1")
        serve(root, manifest, args.backend, args.host, args.port, limits, args.max_connections)
        return 0
    except BundleError as e:
        log(f"error: {e}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
