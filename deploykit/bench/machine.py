"""The machine a measurement ran on, recorded beside every figure."""

from __future__ import annotations

import platform
import sys

import torch

from deploykit.runtime.backends import cpu_threads


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


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
