"""TensorRT engines from exported ONNX: precision flags, 2:4 sparse weights, optimization profiles, a timing cache.

The engine stage builds with it on this machine; a device bundle's ``build_engines.py`` carries copies of
the functions it needs (each marked ``# Copied from deploykit.engines.tensorrt...``, checked by
``utils/check_copies.py``). Written against the TensorRT 10 Python API (type-checked in CI against
``tensorrt-stubs``); ``tensorrt`` is imported only when an engine is built, and its absence is a
:class:`DeployKitError` saying so. Everything that does not need TensorRT (engine names, flags, reading
the build log) is a plain function, tested without it. Optimization profiles come from the model's
description (:meth:`deploykit.models.io_spec.ComponentIO.input_profile`).

Precision:

- ``fp16``: the fp32 ONNX graph, ``BuilderFlag.FP16`` (TensorRT picks fp16 or fp32 per layer, keeping
  fp32 where it must), weakly typed.
- ``int8``: an INT8 QDQ graph (explicit quantization: TensorRT follows the Q/DQ nodes), with
  ``FP16`` and ``INT8`` so the layers between Q/DQ pairs may run in fp16.
- ``strongly_typed``: the graph's own types decide (an fp16 graph, or modelopt's fp16 + QDQ graphs);
  precision flags are then not allowed and are not set.

Sparse weights: ``BuilderFlag.SPARSE_WEIGHTS`` lets TensorRT consider 2:4 sparse tactics on layers
whose weights are 2:4; it uses them only where they win. The build log says which layers were eligible
and which got a sparse implementation (kINFO / kVERBOSE lines); :func:`sparse_layer_lines` picks them out.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deploykit.errors import DeployKitError, InputError

if TYPE_CHECKING:
    import tensorrt as trt

PRECISIONS = ("fp16", "int8", "best")

# ----------------------------------------------------------------------------------------------
# pure functions (no TensorRT needed)


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


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9.]+", "-", text.lower()).strip("-") or "unknown"


def engine_name(gpu_name: str, trt_version: str, precision: str, sparse: bool = False) -> str:
    """``<gpu>_trt<version>_<precision>[-sparse].engine``: an engine runs only on the GPU model and
    TensorRT version it was built with, so both are in its name.

    >>> engine_name("NVIDIA H100 80GB HBM3", "10.13.0.35", "fp16")
    'nvidia-h100-80gb-hbm3_trt10.13.0.35_fp16.engine'
    """
    return f"{_slug(gpu_name)}_trt{_slug(trt_version)}_{precision}{'-sparse' if sparse else ''}.engine"


_SPARSE_PATTERNS = (
    re.compile(r"sparse", re.IGNORECASE),
    re.compile(r"structured sparsity", re.IGNORECASE),
)


def sparse_layer_lines(log_lines: Iterable[str]) -> list[str]:
    """The build log's lines about 2:4 sparsity, e.g. "(Sparsity) Layers eligible for sparse math: ..."
    and "(Sparsity) TRT inference plan picked sparse implementation for layers: ..."."""
    return [line.strip() for line in log_lines if any(p.search(line) for p in _SPARSE_PATTERNS)]


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


def builder_flag_names(fp16: bool, int8: bool, sparse_weights: bool, strongly_typed: bool = False) -> list[str]:
    """Names of the ``trt.BuilderFlag`` members a build sets. A strongly typed network takes its
    precision from the graph: FP16 / INT8 flags are not allowed there and are left out."""
    flags = [] if strongly_typed else ["FP16"] * fp16 + ["INT8"] * int8
    return flags + ["SPARSE_WEIGHTS"] * sparse_weights


def precision_flags(precision: str, has_qdq: bool) -> tuple[bool, bool]:
    """(fp16, int8) for an engine precision: ``int8`` needs a QDQ graph; ``best`` is int8 where the
    graph has Q/DQ nodes, fp16 otherwise."""
    if precision not in PRECISIONS:
        raise InputError(f"engine precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "int8" and not has_qdq:
        raise InputError("engine precision int8 needs an INT8 QDQ ONNX graph (a quantize stage's onnx_int8); "
                         "TensorRT's implicit INT8 calibration is deprecated and not supported here")
    int8 = precision == "int8" or (precision == "best" and has_qdq)
    return True, int8


# ----------------------------------------------------------------------------------------------
# TensorRT


def require_tensorrt() -> None:
    """Raise a :class:`DeployKitError` saying why when ``import tensorrt`` fails."""
    reason = tensorrt_missing()
    if reason is not None:
        raise DeployKitError(reason)


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
        raise DeployKitError(f"TensorRT could not parse {onnx_path}: " + "; ".join(errors[:5]))

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
                raise InputError(f"engine profile: no shapes for input {tensor.name!r} of {onnx_path}")
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
        raise DeployKitError(f"TensorRT failed to build an engine from {onnx_path}:\n{tail}")

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


def gpu_name() -> str:
    """The CUDA device TensorRT builds for (torch's name for device 0)."""
    import torch

    if not torch.cuda.is_available():
        raise DeployKitError("TensorRT engines are built on an NVIDIA GPU: torch sees no CUDA device here")
    return torch.cuda.get_device_name(0)


def trt_runner(engine_path: str | Path, name: str | None = None) -> Any:
    """A polygraphy runner for a serialized engine (for comparisons in the verify stage)."""
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner

    require_tensorrt()
    return TrtRunner(EngineFromBytes(Path(engine_path).read_bytes()), name=name or Path(engine_path).name)
