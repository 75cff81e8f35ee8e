"""The tiny Jetson artifact, and the two servers of the /generate contract started as users start them:
`deploykit serve ARTIFACT` and `python3 bundle/run.py serve` (with `import deploykit` blocked, as on a
device), each a process of its own on 127.0.0.1, serving the same student."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.conftest import _build_quietly
from tests.raw_http import GET_HEALTH, exchange

JETSON_RECIPE = """\
name: tiny-jetson
teacher: random:tiny-sd
resolution: 32
target: jetson-agx-orin
seed: 0
stages:
  - stage: prune
    macs_target: 0.5
    round_to: 4
  - stage: export
    check_batch: 2
  - stage: bundle
    warmup: 1
    runs: 5
"""

# Runs a bundle script with `import deploykit` failing, as on a device without deploykit (and whatever else
# BLOCK_IMPORTS names: a device without Pillow)
NO_DEPLOYKIT = """\
import importlib.abc, os, runpy, sys
BLOCKED = ["deploykit"] + os.environ.get("BLOCK_IMPORTS", "").split()
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if any(name == b or name.startswith(b + ".") for b in BLOCKED):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked: a device has no {name.split('.')[0]})")
sys.meta_path.insert(0, Block())
script = sys.argv[1]
sys.argv = sys.argv[1:]
runpy.run_path(script, run_name="__main__")
"""

SERVERS = ("deploykit serve", "run.py serve")
_built: dict[str, Path] = {}


def jetson_artifact(tmp_path_factory) -> Path:
    """The tiny SD pipeline with a Jetson recipe: prune, export, bundle (about a minute on 2 cores); built once
    per test session, whichever module asks first."""
    key = str(tmp_path_factory.getbasetemp())
    if key not in _built:
        _built[key] = _build_quietly(tmp_path_factory.mktemp("jetson"), JETSON_RECIPE)
    return _built[key]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    name: str
    port: int
    proc: subprocess.Popen
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def command(name: str, artifact: Path, port: int, *flags: str) -> list[str]:
    """The command line that serves ``artifact``'s student on ``port``: the same flags to either server."""
    if name == "deploykit serve":
        return [sys.executable, "-m", "deploykit.cli", "serve", str(artifact), "--backend", "onnxruntime-cpu",
                "--max-batch", "1", "--port", str(port), *flags]
    return [sys.executable, "-c", NO_DEPLOYKIT, str(artifact / "bundle" / "run.py"), "serve", "--backend", "onnxruntime-cpu",
            "--port", str(port), *flags]


@contextmanager
def running(name: str, artifact: Path, log: Path, *flags: str):
    """``name`` (one of SERVERS) serving ``artifact`` until the block ends; yields a Server once /health answers."""
    port = free_port()
    with open(log, "wb") as out:
        proc = subprocess.Popen(command(name, artifact, port, *flags), stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
    server = Server(name, port, proc, log)
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if exchange(port, GET_HEALTH, timeout=5).status == 200:
                    break
            except OSError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, f"{name} did not start:\n{server.output()}"
            time.sleep(0.3)
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
