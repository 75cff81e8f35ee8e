"""deploykit serve: generate through HTTP, refuse what is wrong with a clear 4xx, stay up under load."""

import base64
import io
import json
import socket
import threading
import time
from contextlib import ExitStack, contextmanager

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from deploykit.serve import ServeConfig, create_app
from deploykit.serve.batcher import Batcher, Expired
from tests.raw_http import GET_HEALTH, exchange, post, read_reply, serving, trickle


def image_of(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data))


@contextmanager
def client_for(pipeline, **config):
    with TestClient(create_app(pipeline, ServeConfig(**config))) as client:
        yield client


class Gate:
    """Holds the model's batches until opened, and records how many requests each batch had (and their seeds)."""

    def __init__(self, pipeline, monkeypatch):
        self.open_event, self.batches, self.seeds, run = threading.Event(), [], [], pipeline.run_batch

        def gated(requests):
            self.batches.append(len(requests))
            self.seeds.append([r.seed for r in requests])
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


def hold_the_worker(app, url: str) -> tuple[threading.Thread, list]:
    """POST a request (seed 1) for the Gate to hold in the model; its thread, and the list its response goes to."""
    results: list = []
    thread = post_in_thread(f"{url}/generate", {"steps": 2, "seed": 1}, results)
    wait_until(lambda: app.state.batcher.busy)
    return thread, results


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
    with serving(app) as (url, _), httpx.Client(base_url=url, timeout=60) as client:
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
    with serving(app) as (url, _):
        running, results = hold_the_worker(app, url)
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
    with serving(app) as (url, _):
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


def test_a_request_over_the_compute_budget_gets_422_before_any_work(sd_pipeline, monkeypatch):
    gate = Gate(sd_pipeline, monkeypatch)
    gate.open()
    # the default budget is the largest request at the artifact's own size (32x32): 32*32 x 10 steps x 2 images
    with client_for(sd_pipeline, max_steps=10, max_side=64, max_images=2, warmup=False) as client:
        assert client.get("/health").json()["max_pixel_steps"] == 32 * 32 * 10 * 2
        r = client.post("/generate", json={"prompt": "a cat", "steps": 10, "width": 64, "height": 64, "num_images": 2,
                                           "format": "base64"})
        assert r.status_code == 422 and r.json()["error"].startswith("body: ")
        assert "81,920 pixel-steps, over this server's limit of 20,480" in r.json()["error"]
        assert gate.batches == []  # refused before the queue: the model never saw it
        # a default is held to the server's limits too: 20 steps by default, 10 at most here
        assert client.post("/generate", json={"prompt": "a cat"}).json()["error"] == "steps: at most 10 on this server"
        # each field within its own limit, and the product within the budget: served
        ok = client.post("/generate", json={"prompt": "a cat", "steps": 2, "width": 64, "height": 64, "num_images": 2,
                                            "format": "base64"})
        assert ok.status_code == 200, ok.text
    with client_for(sd_pipeline, max_pixel_steps=32 * 32 * 3, warmup=False) as client:
        assert "limit of 3,072" in client.post("/generate", json={"prompt": "a cat", "steps": 4}).json()["error"]
        assert client.post("/generate", json={"prompt": "a cat", "steps": 3}).status_code == 200


def test_body_length_problems_get_their_own_status_and_close_the_connection(zoo_pipeline):
    app = create_app(zoo_pipeline, ServeConfig(max_body_bytes=1024, read_timeout_s=0.5, warmup=False))
    body = json.dumps({"steps": 2, "seed": 0}).encode()
    with serving(app) as (_, port):
        assert exchange(port, post("/generate", body)).status == 200
        missing = exchange(port, post("/generate", body, length=None))
        assert missing.status == 411 and missing.closed
        huge = exchange(port, post("/generate", b"{}", length=10**12))
        assert huge.status == 413 and huge.closed
        for bad in ("-1", "ten", "1, 2", str(10**30)):  # h11 refuses these before the app sees them
            r = exchange(port, post("/generate", body, f"Content-Length: {bad}", length=None))
            assert r.status == 400 and r.closed, bad
        chunked = b"".join([post("/generate", b"", "Transfer-Encoding: chunked", length=None), b"400\r\n", b"x" * 1024,
                            b"\r\n400\r\n", b"x" * 1024, b"\r\n0\r\n\r\n"])
        over = exchange(port, chunked)
        assert over.status == 413 and over.closed
        assert exchange(port, GET_HEALTH).status == 200


def test_a_slow_or_stalled_client_gets_408_or_is_dropped(zoo_pipeline):
    app = create_app(zoo_pipeline, ServeConfig(read_timeout_s=0.5, warmup=False))
    with serving(app) as (_, port):
        # headers, then less body than announced, then nothing
        stalled = exchange(port, post("/generate", b'{"steps"', length=100))
        assert stalled.status == 408 and stalled.closed and b"did not arrive within 0.5 s" in stalled.body
        # the body a byte at a time: the deadline is for the whole body, not each byte
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(post("/generate", b"", length=400))
            trickle(sock, [b" "] * 400)
            reply = read_reply(sock)
            assert reply.status == 408 and reply.closed
        # headers that never end: the connection is dropped, without an answer
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"POST /generate HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            trickle(sock, [f"X-Slow-{i}: 1\r\n".encode() for i in range(400)])
            assert read_reply(sock).status is None
        assert exchange(port, GET_HEALTH).status == 200
        metrics = httpx.get(f"http://127.0.0.1:{port}/metrics").text
        assert 'deploykit_requests_total{status="408"} 2.0' in metrics


def test_health_and_metrics_answer_while_every_slot_is_held_and_many_connections_idle(zoo_pipeline, monkeypatch):
    gate = Gate(zoo_pipeline, monkeypatch)
    app = create_app(zoo_pipeline, ServeConfig(max_batch=1, queue_size=2, read_timeout_s=30, warmup=False))
    with serving(app) as (url, port), ExitStack() as idle:
        running, results = hold_the_worker(app, url)
        threads = [running]
        for seed, depth in ((2, 1), (3, 2)):  # one at a time: three at once could all wait before the worker takes one
            threads.append(post_in_thread(f"{url}/generate", {"steps": 2, "seed": seed}, results))
            wait_until(lambda: app.state.batcher.depth == depth)
        for i in range(150):  # connected and silent, or half-way through their headers
            sock = idle.enter_context(socket.create_connection(("127.0.0.1", port), timeout=10))
            if i % 2:
                sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        health = httpx.get(f"{url}/health", timeout=5)
        assert health.status_code == 200 and health.json()["busy"] and health.json()["queue_depth"] == 2
        metrics = httpx.get(f"{url}/metrics", timeout=5)
        assert metrics.status_code == 200 and "deploykit_queue_depth 2.0" in metrics.text
        assert httpx.post(f"{url}/generate", json={"steps": 2}, timeout=5).status_code == 503  # the queue, not a socket cap
        gate.open()
        for t in threads:
            t.join(60)
        assert sorted(r.status_code for r in results) == [200, 200, 200]


def test_a_request_that_times_out_while_queued_is_never_run(zoo_pipeline, monkeypatch):
    gate = Gate(zoo_pipeline, monkeypatch)
    app = create_app(zoo_pipeline, ServeConfig(max_batch=1, timeout_s=1.0, warmup=False))
    with serving(app) as (url, _):
        running, results = hold_the_worker(app, url)
        queued = httpx.post(f"{url}/generate", json={"steps": 2, "seed": 2}, timeout=30)
        assert queued.status_code == 504 and "dropped from the queue" in queued.json()["error"]
        running.join(30)
        assert results[0].status_code == 504 and "its batch had already started" in results[0].json()["error"]
        gate.open()
        assert httpx.post(f"{url}/generate", json={"steps": 2, "seed": 3}, timeout=30).status_code == 200
        assert gate.seeds == [[1], [3]]  # seed 2 never reached the model


def test_the_batcher_never_starts_a_job_past_its_deadline():
    release, ran = threading.Event(), []

    def run(items):
        ran.extend(items)
        assert release.wait(30)
        return items

    batcher = Batcher(run, max_batch=1, max_wait_ms=0).start()
    try:
        first = batcher.submit("first", "k")
        wait_until(lambda: batcher.busy)
        late = batcher.submit("late", "k", deadline=time.monotonic() + 0.05)  # nobody cancels it
        time.sleep(0.1)
        following = batcher.submit("following", "k")
        release.set()
        assert first.result(30) == "first" and following.result(30) == "following"
        with pytest.raises(Expired):
            late.result(30)
        assert ran == ["first", "following"]
    finally:
        batcher.stop()


def test_a_client_that_leaves_while_queued_is_dropped(zoo_pipeline, monkeypatch):
    gate = Gate(zoo_pipeline, monkeypatch)
    app = create_app(zoo_pipeline, ServeConfig(max_batch=1, warmup=False))
    with serving(app) as (url, port):
        running, results = hold_the_worker(app, url)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(post("/generate", json.dumps({"steps": 2, "seed": 2}).encode()))
            wait_until(lambda: app.state.batcher.depth == 1)
        wait_until(lambda: app.state.batcher.depth == 0)  # gone with its client, before the worker is free
        gate.open()
        running.join(30)
        assert results[0].status_code == 200 and gate.seeds == [[1]]
        assert 'deploykit_requests_total{status="499"} 1.0' in httpx.get(f"{url}/metrics").text
