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
import hashlib
import html
import io
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
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
    if manifest.get("format") != FORMAT:
        raise BundleError(f"{path}: bundle format {manifest.get('format')!r}; this run.py reads format {FORMAT}")
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
    return json.loads(path.read_text())


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
    if entry is None or not (root / entry["engine"]).is_file():
        raise BundleError(f"no TensorRT engine for {component}: run `sh build_engines.sh` on this device")
    if entry.get("onnx_sha256") != manifest["files"].get(spec["onnx"]):
        raise BundleError(f"the {component} engine was built from another ONNX graph: run `sh build_engines.sh`")
    return TensorRTModel(root / entry["engine"])


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

    def generate(self, prompt: str, negative_prompt: str, steps: int, guidance_scale: float, seed: int,
                 noise: np.ndarray | None = None) -> np.ndarray:
        """One image, HWC uint8, from ``noise`` (1, C, h, w) or noise drawn from ``seed``."""
        scheduler = DDIM(*self.scheduler_args)
        x = (np.random.default_rng(seed).standard_normal((1, *self.sample_shape)) if noise is None else noise)
        x = np.asarray(x, dtype=np.float32)
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
# serve


class RequestError(ValueError):
    pass


def parse_request(body: dict, generator: Generator, max_steps: int) -> dict:
    known = {"prompt", "negative_prompt", "steps", "guidance_scale", "seed", "height", "width"}
    unknown = sorted(set(body) - known)
    if unknown:
        raise RequestError(f"{unknown[0]}: unknown field")
    req = {"prompt": body.get("prompt"), "negative_prompt": body.get("negative_prompt") or "",
           "steps": body.get("steps", 20), "guidance_scale": body.get("guidance_scale", 7.5),
           "seed": body.get("seed", int.from_bytes(os.urandom(4), "little"))}
    if generator.kind == "sd":
        if not isinstance(req["prompt"], str) or not req["prompt"]:
            raise RequestError("prompt: required, a string")
        if not isinstance(req["negative_prompt"], str):
            raise RequestError("negative_prompt: a string")
    elif req["prompt"] is not None:
        raise RequestError("prompt: this bundle's model is an unconditional pixel-space UNet; it takes no prompt")
    if not isinstance(req["steps"], int) or isinstance(req["steps"], bool) or not 1 <= req["steps"] <= max_steps:
        raise RequestError(f"steps: an integer from 1 to {max_steps}")
    if not isinstance(req["guidance_scale"], (int, float)) or isinstance(req["guidance_scale"], bool) \
            or not 0 <= req["guidance_scale"] <= 50:
        raise RequestError("guidance_scale: a number from 0 to 50")
    if not isinstance(req["seed"], int) or isinstance(req["seed"], bool) or not 0 <= req["seed"] < 2 ** 32:
        raise RequestError("seed: an integer from 0 to 2**32 - 1")
    for name in ("height", "width"):
        if name in body and body[name] != generator.size:
            raise RequestError(f"{name}: the engines were built for {generator.size}x{generator.size} images only")
    return req


def make_handler(generator: Generator, max_steps: int) -> type[BaseHTTPRequestHandler]:
    lock = threading.Lock()  # one model: one generation at a time

    class Handler(BaseHTTPRequestHandler):
        server_version = "deploykit-bundle/1"

        def _send(self, status: int, body: bytes, content_type: str, headers: dict | None = None) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)

        def _json(self, status: int, obj: dict) -> None:
            self._send(status, json.dumps(obj).encode(), "application/json")

        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            if self.path == "/health":
                self._json(200, {"status": "ok", "kind": generator.kind, "backend": generator.backend,
                                 "size": generator.size, "recipe": generator.manifest.get("recipe")})
            elif self.path == "/":
                text = (f"<p>deploykit bundle {html.escape(str(generator.manifest.get('recipe')))}: POST /generate "
                        "{\"prompt\": ...}, GET /health</p>")
                self._send(200, text.encode(), "text/html; charset=utf-8")
            else:
                self._json(404, {"error": f"no such path: {self.path}"})

        def do_POST(self) -> None:  # noqa: N802
            if self.path != "/generate":
                self._json(404, {"error": f"no such path: {self.path}"})
                return
            length = int(self.headers.get("Content-Length") or 0)
            if length > 65536:
                self._json(413, {"error": "body too large"})
                return
            try:
                body = json.loads(self.rfile.read(length) or b"{}")
                if not isinstance(body, dict):
                    raise ValueError("not an object")
            except ValueError:
                self._json(400, {"error": "the body must be a JSON object"})
                return
            try:
                req = parse_request(body, generator, max_steps)
            except RequestError as e:
                self._json(422, {"error": str(e)})
                return
            try:
                started = time.perf_counter()
                with lock:
                    image = generator.generate(req["prompt"] or "", req["negative_prompt"], req["steps"],
                                               float(req["guidance_scale"]), req["seed"])
                seconds = time.perf_counter() - started
            except Exception as e:  # noqa: BLE001 - the server goes on
                self._json(500, {"error": f"{type(e).__name__}: {e}"})
                return
            self._send(200, png_bytes(image), "image/png", {"X-Seed": str(req["seed"]), "X-Seconds": f"{seconds:.3f}"})

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (http.server's signature)
            log(f"{self.address_string()} {format % args}")

    return Handler


def serve(root: Path, manifest: dict, backend: str, host: str, port: int, max_steps: int, warmup: bool) -> None:
    problems = verify(root, manifest) + [f"missing {x}" for x in missing_libraries()]
    if problems:
        raise BundleError("cannot serve: " + "; ".join(problems[:5]))
    generator = Generator(root, manifest, backend)
    if warmup:
        generator.generate("warm-up", "", 1, 7.5, 0)
    server = ThreadingHTTPServer((host, port), make_handler(generator, max_steps))
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
    p.add_argument("--max-steps", type=int, default=100)
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
        serve(root, manifest, args.backend, args.host, args.port, args.max_steps, not args.no_warmup)
        return 0
    except BundleError as e:
        log(f"error: {e}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
