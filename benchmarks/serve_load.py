"""Load test of `deploykit serve`, on loopback: `python benchmarks/serve_load.py`.

Starts the server (a subprocess, `deploykit serve`, bound to 127.0.0.1) on a small artifact — by
default the shipped zoo:digits teacher pruned and exported, built into a temporary folder — and runs
N concurrent clients, each sending its requests one after another, once with batching off
(``--max-batch 1``) and once on. Every request has its own seed and the same shape, so with batching
on the server may merge any of them. Writes `benchmarks/results/serve_load.json` and `.md` with the
machine it ran on. Bounded: N clients x R requests, a timeout per request, nothing leaves the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RECIPE = """\
name: serve-load
teacher: zoo:digits
seed: 0
stages:
  - stage: prune
    macs_target: 0.5
  - stage: export
    check_batch: 2
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_default_artifact(folder: Path) -> Path:
    recipe = folder / "recipe.yaml"
    recipe.write_text(RECIPE)
    subprocess.run([sys.executable, "-m", "deploykit.cli", "build", str(recipe), "--out", str(folder / "artifact")],
                   cwd=REPO, check=True)
    return folder / "artifact"


class Server:
    def __init__(self, artifact: Path, max_batch: int, max_wait_ms: float, queue_size: int, backend: str | None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "deploykit.cli", "serve", str(artifact), "--host", "127.0.0.1", "--port",
               str(self.port), "--max-batch", str(max_batch), "--max-wait-ms", str(max_wait_ms), "--queue-size",
               str(queue_size)] + (["--backend", backend] if backend else [])
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def wait_ready(self, timeout: float = 120) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited: {self.proc.stderr.read()}")
            try:
                r = httpx.get(f"{self.url}/health", timeout=2)
                if r.status_code == 200:
                    return r.json()
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise TimeoutError("the server did not become healthy")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def batches_run(metrics: str) -> int:
    m = re.search(r"^deploykit_batch_requests_count ([0-9.e+-]+)$", metrics, re.M)
    return int(float(m.group(1))) if m else 0


async def run_clients(url: str, clients: int, requests: int, payload: dict, timeout: float) -> dict:
    latencies: list[float] = []
    statuses: dict[str, int] = {}

    async def client(index: int, http: httpx.AsyncClient) -> None:
        for k in range(requests):
            started = time.perf_counter()
            r = await http.post("/generate", json={**payload, "seed": index * requests + k})
            latencies.append(time.perf_counter() - started)
            statuses[str(r.status_code)] = statuses.get(str(r.status_code), 0) + 1

    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as http:
        started = time.perf_counter()
        await asyncio.gather(*(client(i, http) for i in range(clients)))
        wall = time.perf_counter() - started
    ok = statuses.get("200", 0)
    ms = np.array(latencies) * 1e3
    return {"requests": len(latencies), "statuses": statuses, "wall_s": round(wall, 3),
            "throughput_rps": round(ok / wall, 2), "images_per_s": round(ok * payload.get("num_images", 1) / wall, 2),
            "p50_ms": round(float(np.percentile(ms, 50)), 1), "p99_ms": round(float(np.percentile(ms, 99)), 1),
            "mean_ms": round(float(ms.mean()), 1)}


def measure(artifact: Path, args, max_batch: int) -> dict:
    server = Server(artifact, max_batch, args.max_wait_ms, max(args.clients * 2, 16), args.backend)
    try:
        health = server.wait_ready()
        payload = {"steps": args.steps, "scheduler": args.scheduler}
        if health["kind"] != "pixel":
            payload["prompt"] = args.prompt
        asyncio.run(run_clients(server.url, 2, 1, payload, args.timeout))  # connections and kernels warm
        before = batches_run(httpx.get(f"{server.url}/metrics").text)
        result = asyncio.run(run_clients(server.url, args.clients, args.requests, payload, args.timeout))
        batches = batches_run(httpx.get(f"{server.url}/metrics").text) - before
        result.update(max_batch=max_batch, max_wait_ms=args.max_wait_ms, batches=batches,
                      mean_requests_per_batch=round(result["statuses"].get("200", 0) / batches, 2) if batches else None)
        return {"health": health, "result": result}
    finally:
        server.stop()


def write_markdown(path: Path, out: dict) -> None:
    m, cfg = out["machine"], out["config"]
    lines = [
        "# serve_load: `deploykit serve` under concurrent clients, on loopback",
        "",
        f"`{out['command']}` on {m['cpu']}, {m['threads']} threads, torch {m['torch']}; artifact {out['artifact']} "
        f"({out['kind']}, backend {out['backend']}, {out['image_size']}).",
        "",
        f"{cfg['clients']} concurrent clients x {cfg['requests']} requests each (one after another), "
        f"{cfg['steps']} {cfg['scheduler']} steps per image, one image per request, each request its own seed; "
        "latency is per request from send to full response, queueing included.",
        "",
        "| mode | max batch | requests/s | p50 ms | p99 ms | mean requests per batch | statuses |",
        "|---|---|---|---|---|---|---|",
    ]
    for mode, r in out["modes"].items():
        lines.append(f"| {mode} | {r['max_batch']} | {r['throughput_rps']:.2f} | {r['p50_ms']:.0f} | {r['p99_ms']:.0f} | "
                     f"{r['mean_requests_per_batch']} | {', '.join(f'{k}: {v}' for k, v in r['statuses'].items())} |")
    off, on = out["modes"]["no batching"], out["modes"]["batching"]
    lines += ["", f"Batching: {on['throughput_rps'] / off['throughput_rps']:.2f}x the throughput, p50 latency "
              f"{on['p50_ms'] / off['p50_ms']:.2f}x (max wait {cfg['max_wait_ms']:g} ms for a batch to fill)."]
    path.write_text("\n".join(lines) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifact", type=Path, help="artifact to serve (default: zoo:digits pruned and exported, built "
                                                      "into a temporary folder)")
    parser.add_argument("--backend", help="default: the server's choice")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=6, help="per client")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--scheduler", default="ddim")
    parser.add_argument("--prompt", default="a red bicycle", help="for text-to-image artifacts")
    parser.add_argument("--max-batch", type=int, default=8, help="with batching on")
    parser.add_argument("--max-wait-ms", type=float, default=10.0)
    parser.add_argument("--timeout", type=float, default=120.0, help="per request, client side")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    if not 1 <= args.clients <= 64 or not 1 <= args.requests <= 100:
        parser.error("keep it bounded: 1-64 clients, 1-100 requests each")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

    from deploykit.bench.machine import command_line, device_info

    with tempfile.TemporaryDirectory() as tmp:
        artifact = args.artifact or build_default_artifact(Path(tmp))
        modes, health = {}, None
        for mode, max_batch in (("no batching", 1), ("batching", args.max_batch)):
            measured = measure(artifact, args, max_batch)
            modes[mode], health = measured["result"], measured["health"]
            print(f"{mode}: {json.dumps(modes[mode])}", file=sys.stderr)
    out = {
        "command": command_line("benchmarks/serve_load.py"),
        "machine": device_info(),
        "artifact": str(args.artifact) if args.artifact else "zoo:digits, pruned to 50% MACs and exported (built here)",
        "kind": health["kind"], "backend": health["backend"], "image_size": f"{health['width']}x{health['height']}",
        "config": {"clients": args.clients, "requests": args.requests, "steps": args.steps, "scheduler": args.scheduler,
                   "max_wait_ms": args.max_wait_ms},
        "modes": modes,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "serve_load.json").write_text(json.dumps(out, indent=2) + "\n")
    write_markdown(args.out / "serve_load.md", out)
    print((args.out / "serve_load.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
