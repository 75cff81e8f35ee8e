"""The machine a measurement ran on, recorded beside every figure."""

from __future__ import annotations

import platform
import sys

import torch

from deploykit.runtime.backends import cpu_threads

# The vector extensions that decide CPU figures: "AMD EPYC" has named both an AVX2-only part and an
# AVX-512 one with VNNI and BF16 here, and INT8 (VNNI) and OpenVINO's default bf16 gain only on the latter.
_ISA_FLAGS = (("avx512f", "AVX-512"), ("avx512_vnni", "VNNI"), ("avx_vnni", "AVX-VNNI"), ("avx512_bf16", "BF16"),
              ("amx_int8", "AMX"))


def cpu_features(flags: set[str]) -> list[str]:
    """The widest vector ISA in /proc/cpuinfo's ``flags``, named as vendors do (``AVX2``, ``AVX-512``, ``VNNI``...)."""
    named = [name for flag, name in _ISA_FLAGS if flag in flags]
    if "VNNI" in named and "AVX-VNNI" in named:  # the 256-bit encoding of the same instructions
        named.remove("AVX-VNNI")
    return named if "AVX-512" in named else (["AVX2"] if "avx2" in flags else []) + named


def cpu_name() -> str:
    """The CPU's model name with its vector ISA, e.g. ``AMD EPYC (AVX2)``."""
    model, flags = None, set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and model is None:
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    model = model or platform.processor() or platform.machine()
    features = cpu_features(flags)
    return f"{model} ({', '.join(features)})" if features else model


def device_info(cuda: bool = False) -> dict:
    info = {"cpu": cpu_name(), "threads": cpu_threads(), "torch": torch.__version__}
    if cuda and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    return info


def command_line(script: str) -> str:
    """The command that regenerates a benchmark's committed files; ``--out`` is left out, it only
    says where they went."""
    kept, skip = [], False
    for arg in sys.argv[1:]:
        if skip:
            skip = False
        elif arg == "--out":
            skip = True
        elif not arg.startswith("--out="):
            kept.append(arg)
    return " ".join([f"python {script}", *kept])
