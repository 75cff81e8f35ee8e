"""deploykit serve: generate through HTTP, refuse what is wrong with a clear 4xx, stay up under load."""

import base64
import io
import threading
import time
from contextlib import contextmanager

import httpx
import numpy as np
import pytest
import uvicorn
from fastapi.testclient import TestClient
from PIL import Image

from deploykit.serve import ServeConfig, create_app


def image_of(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data))


@contextmanager
def serving(app):
    """The app under a real uvicorn on 127.0.0.1, on a port the OS picks."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


@contextmanager
def client_for(pipeline, **config):
    with TestClient(create_app(pipeline, ServeConfig(**config))) as client:
        yield client


class Gate:
    """Holds the model's batches until opened, and records how many requests each batch had."""

    def __init__(self, pipeline, monkeypatch):
        self.open_event, self.batches, run = threading.Event(), [], pipeline.run_batch

        def gated(requests):
            self.batches.append(len(requests))
            assert self.open_event.wait(60)
            return run(requests)
        monkeypatch.setattr(pipeline, "run_batch", gated)

    def open(self):
        self.open_event.set()


def wait_until(condition, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def post_in_thread(url: str, payload: dict, results: list) -> threading.Thread:
    def go():
        results.append(httpx.post(url, json=payload, timeout=60))
    thread = threading.Thread(target=go)
    thread.start()
    return thread


def test_zoo_artifact_generates_png(zoo_pipeline):
    with client_for(zoo_pipeline) as client:
        r = client.post("/generate", json={"steps": 5, "seed": 3})
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
        assert r.headers["x-seed"] == "3" and r.headers["x-backend"] == "onnxruntime-cpu"
        image = image_of(r.content)
        assert image.size == (16, 16) and image.mode == "L"
        assert client.post("/generate", json={"steps": 5, "seed": 3}).content == r.content
        # no seed: the server draws one and says which, so that the image can be made again
        drawn = client.post("/generate", json={"steps": 5})
        assert client.post("/generate", json={"steps": 5, "seed": int(drawn.headers["x-seed"])}).content == drawn.content


def test_sd_artifact_generates_over_real_http(sd_pipeline):
    app = create_app(sd_pipeline, ServeConfig(max_batch=4))
    with serving(app) as url, httpx.Client(base_url=url, timeout=60) as client:
        health = client.get("/health").json()
        assert health["status"] == "ok" and health["kind"] == "sd" and health["backend"] == "onnxruntime-cpu"
        r = client.post("/generate", json={"prompt": "a red bicycle", "negative_prompt": "blurry", "steps": 3, "seed": 5,
                                           "guidance_scale": 5.0, "scheduler": "euler", "width": 48, "height": 32,
                                           "num_images": 2, "format": "base64"})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["seed"] == 5 and (body["width"], body["height"]) == (48, 32) and len(body["images"]) == 2
        images = [image_of(base64.b64decode(b)) for b in body["images"]]
        assert all(im.size == (48, 32) and im.mode == "RGB" for im in images)
        png = client.post("/generate", json={"prompt": "a red bicycle", "steps": 2, "seed": 1})
        assert png.status_code == 200 and image_of(png.content).size == (32, 32)
        metrics = client.get("/metrics").text
        assert 'deploykit_requests_total{status="200"} 2.0' in metrics
        assert 'deploykit_request_latency_seconds_count{status="200"} 2.0' in metrics
        assert "deploykit_queue_depth 0.0" in metrics and "deploykit_batch_images_bucket" in metrics


def test_bad_requests_get_a_4xx_that_names_the_problem(zoo_pipeline, sd_pipeline):
    def check(client, status, field=None, **kwargs):
        r = client.post("/generate", **kwargs)
        assert r.status_code == status, r.text
        body = r.json()
        assert body["error"]
        if field:
            assert field in body["fields"] and body["error"].startswith(f"{field}: "), body
        return body

    with client_for(sd_pipeline, max_steps=50, max_side=64, max_prompt_chars=100, max_images=2,
                    max_body_bytes=2048) as client:
        ok = {"prompt": "a cat", "steps": 2}
        assert "not valid JSON" in check(client, 400, content=b'{"prompt": "a cat",', headers={"content-type": "application/json"})["error"]
        check(client, 400, content=b"\xff\xfe", headers={"content-type": "application/json"})
        assert check(client, 422, "body", json=["a cat"])["fields"]["body"] == "must be a JSON object"
        check(client, 422, "steps", json={**ok, "steps": "20"})               # strict types
        check(client, 422, "steps", json={**ok, "steps": 2.5})
        check(client, 422, "prompt", json={**ok, "prompt": 5})
        check(client, 422, "format", json={**ok, "format": "jpeg"})
        assert check(client, 422, "colour", json={**ok, "colour": "red"})["fields"]["colour"] == "unknown field"
        assert "at most 50" in check(client, 422, "steps", json={**ok, "steps": 51})["error"]
        assert "at most 64 pixels" in check(client, 422, "width", json={**ok, "width": 4096})["error"]
        assert "multiple of 8" in check(client, 422, "height", json={**ok, "height": 36})["error"]
        assert "at most 100 characters" in check(client, 422, "prompt", json={**ok, "prompt": "x" * 101})["error"]
        check(client, 422, "num_images", json={**ok, "num_images": 3, "format": "base64"})
        check(client, 422, "format", json={**ok, "num_images": 2})            # png is one image
        check(client, 422, "seed", json={**ok, "seed": -1})
        check(client, 422, "prompt", json={"steps": 2})                       # SD needs a prompt
        assert "2048 bytes" in check(client, 413, json={**ok, "prompt": "x" * 3000})["error"]
        assert client.get("/health").json()["status"] == "ok"
        assert client.post("/generate", json=ok).status_code == 200
        assert 'deploykit_requests_total{status="422"}' in client.get("/metrics").text
    with client_for(zoo_pipeline) as client:
        assert "no prompt" in check(client, 422, "prompt", json={"prompt": "a cat"})["error"]
        assert "16x16" in check(client, 422, "width", json={"width": 32})["error"]
        assert client.get("/health").status_code == 200


def test_full_queue_gets_503_and_the_server_goes_on(zoo_pipeline, monkeypatch):
    gate = Gate(zoo_pipeline, monkeypatch)
    app = create_app(zoo_pipeline, ServeConfig(max_batch=1, queue_size=1, warmup=False))
    with serving(app) as url:
        results: list = []
        running = post_in_thread(f"{url}/generate", {"steps": 2, "seed": 1}, results)
        wait_until(lambda: app.state.batcher.busy)
        waiting = post_in_thread(f"{url}/generate", {"steps": 2, "seed": 2}, results)
        wait_until(lambda: app.state.batcher.depth == 1)
        refused = httpx.post(f"{url}/generate", json={"steps": 2}, timeout=30)
        assert refused.status_code == 503 and "queue full" in refused.json()["error"]
        assert int(refused.headers["retry-after"]) >= 1
        health = httpx.get(f"{url}/health").json()  # the event loop answers while the model is busy
        assert health["busy"] and health["queue_depth"] == 1
        assert "deploykit_queue_depth 1.0" in httpx.get(f"{url}/metrics").text
        gate.open()
        running.join(60)
        waiting.join(60)
        assert [r.status_code for r in results] == [200, 200]
        assert httpx.post(f"{url}/generate", json={"steps": 2}, timeout=30).status_code == 200


def test_timeout_gets_504_and_a_failed_batch_500(zoo_pipeline, monkeypatch):
    gate = Gate(zoo_pipeline, monkeypatch)
    with client_for(zoo_pipeline, timeout_s=0.3, warmup=False) as client:
        r = client.post("/generate", json={"steps": 2})
        assert r.status_code == 504 and "timed out after 0.3 s" in r.json()["error"]
        gate.open()
        assert client.get("/health").json()["status"] == "ok"
        assert client.post("/generate", json={"steps": 2}).status_code == 200

    def broken(requests):
        raise RuntimeError("the device fell over")
    monkeypatch.setattr(zoo_pipeline, "run_batch", broken)
    with client_for(zoo_pipeline, warmup=False) as client:
        r = client.post("/generate", json={"steps": 2})
        assert r.status_code == 500 and "the device fell over" in r.json()["error"]
        assert client.get("/health").json()["status"] == "ok"


def test_concurrent_requests_batch_and_keep_their_own_images(sd_pipeline, monkeypatch):
    alone = {seed: np.asarray(sd_pipeline("a cat", steps=3, seed=seed, guidance_scale=3.0)[0], dtype=np.int16)
             for seed in (21, 22, 23)}
    gate = Gate(sd_pipeline, monkeypatch)
    app = create_app(sd_pipeline, ServeConfig(max_batch=4, max_wait_ms=50, queue_size=8, warmup=False))
    with serving(app) as url:
        results: list = []
        blocker = post_in_thread(f"{url}/generate", {"prompt": "a dog", "steps": 3, "seed": 1, "guidance_scale": 3.0},
                                 results)
        wait_until(lambda: app.state.batcher.busy)
        threads = [post_in_thread(f"{url}/generate", {"prompt": "a cat", "steps": 3, "seed": s, "guidance_scale": 3.0},
                                  results) for s in (21, 22, 23)]
        # another shape waits for its own batch
        threads.append(post_in_thread(f"{url}/generate", {"prompt": "a cat", "steps": 2, "seed": 4}, results))
        wait_until(lambda: app.state.batcher.depth == 4)
        gate.open()
        for t in [blocker, *threads]:
            t.join(60)
        assert all(r.status_code == 200 for r in results) and len(results) == 5
        assert sorted(gate.batches) == [1, 1, 3]
        for r in results:
            seed = int(r.headers["x-seed"])
            if seed in alone:
                got = np.asarray(image_of(r.content), dtype=np.int16)
                assert np.abs(got - alone[seed]).max() <= 1
        assert "deploykit_batch_requests_bucket{le=\"4.0\"} 3.0" in httpx.get(f"{url}/metrics").text


@pytest.mark.timeout(120)
def test_cli_serves_on_loopback_and_refuses_a_bad_artifact(zoo_serve_artifact, tmp_path, capsys):
    import socket
    import subprocess
    import sys

    from deploykit.cli import main
    from tests.conftest import REPO

    assert main(["serve", str(tmp_path / "missing")]) == 2
    assert main(["serve", str(zoo_serve_artifact), "--backend", "torch-cuda"]) == 2
    err = capsys.readouterr().err
    assert "no such artifact folder" in err and "torch sees no CUDA device" in err and "Traceback" not in err
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "deploykit.cli", "serve", str(zoo_serve_artifact), "--port", str(port),
                             "--max-batch", "2"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline
            time.sleep(0.2)
        r = httpx.post(f"http://127.0.0.1:{port}/generate", json={"steps": 2, "seed": 0}, timeout=30)
        assert r.status_code == 200 and image_of(r.content).size == (16, 16)
    finally:
        proc.terminate()
        proc.wait(20)
