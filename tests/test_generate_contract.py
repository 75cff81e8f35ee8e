"""One /generate contract (docs/serving.md), two servers: every case here runs against a real `deploykit serve`
and a real `python3 bundle/run.py serve`, each started from its command line on 127.0.0.1 with the same
options, serving the same student (the tiny Jetson artifact and its bundle)."""

from __future__ import annotations

import base64
import io
import json
import socket
import threading
import time
from contextlib import ExitStack

import numpy as np
import pytest
from PIL import Image

from tests.device_servers import SERVERS, jetson_artifact, running
from tests.raw_http import GET_HEALTH, exchange, post, read_reply

SIZE = 32  # the artifact's resolution
BUDGET = SIZE * SIZE * 100  # --max-pixel-steps: 100 steps of one image
READ_TIMEOUT_S = 1.0
LIMITS = ("--no-warmup", "--max-steps", "100", "--max-images", "2", "--max-pixel-steps", str(BUDGET), "--queue-size", "1",
          "--read-timeout-s", str(READ_TIMEOUT_S))


@pytest.fixture(scope="module")
def started(tmp_path_factory):
    """Servers started on demand, by (server, extra options), kept for the module."""
    artifact = jetson_artifact(tmp_path_factory)
    logs = tmp_path_factory.mktemp("servers")
    servers: dict = {}
    with ExitStack() as stack:
        def start(name: str, *extra: str):
            key = (name, extra)
            if key not in servers:
                log = logs / f"{name.replace(' ', '-')}-{len(servers)}.log"
                servers[key] = stack.enter_context(running(name, artifact, log, *LIMITS, *extra))
            return servers[key]
        yield start
        for server in servers.values():
            assert "Traceback" not in server.output(), server.output()


@pytest.fixture(params=SERVERS)
def server(request, started):
    return started(request.param)


def call(server, body: bytes | dict, *headers: str) -> tuple[int, dict, bytes]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    reply = exchange(server.port, post("/generate", data, *headers), timeout=120)
    return reply.status, reply.headers, reply.body


def image(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data))


def error_of(status: int, headers: dict, body: bytes) -> dict:
    assert headers["content-type"].startswith("application/json"), (status, headers, body)
    payload = json.loads(body)
    assert isinstance(payload["error"], str) and payload["error"], payload
    return payload


def test_health(server):
    reply = exchange(server.port, GET_HEALTH)
    assert reply.status == 200 and reply.headers["content-type"].startswith("application/json")
    health = json.loads(reply.body)
    assert health["status"] == "ok" and health["kind"] == "sd" and health["backend"] == "onnxruntime-cpu"
    assert health["height"] == health["width"] == SIZE and "ddim" in health["schedulers"]
    assert health["queue_size"] == 1 and health["queue_depth"] == 0 and health["busy"] is False
    assert health["max_batch"] == 1 and health["max_pixel_steps"] == BUDGET


def test_a_png_and_its_seed(server):
    status, headers, body = call(server, {"prompt": "a red bicycle", "steps": 2, "seed": 1})
    assert status == 200 and headers["content-type"] == "image/png", body[:300]
    assert headers["x-seed"] == "1" and headers["x-backend"] == "onnxruntime-cpu"
    assert image(body).size == (SIZE, SIZE) and image(body).mode == "RGB"
    assert call(server, {"prompt": "a red bicycle", "steps": 2, "seed": 1})[2] == body  # a seed makes the image again
    status, headers, drawn = call(server, {"prompt": "a red bicycle", "steps": 2})  # no seed: one is drawn, and said
    assert status == 200 and 0 <= int(headers["x-seed"]) <= 2**32 - 1
    assert call(server, {"prompt": "a red bicycle", "steps": 2, "seed": int(headers["x-seed"])})[2] == drawn
    # every field, at its default or the model's own value; an empty prompt is a prompt
    full = {"prompt": "", "negative_prompt": None, "steps": 1, "guidance_scale": 1, "seed": 0, "scheduler": "ddim",
            "height": SIZE, "width": None, "num_images": 1, "format": "png"}
    assert call(server, full)[0] == 200


def test_base64_images(server):
    status, headers, body = call(server, {"prompt": "a cat", "steps": 2, "seed": 5, "num_images": 2, "format": "base64"})
    assert status == 200 and headers["content-type"].startswith("application/json") and headers["x-seed"] == "5"
    payload = json.loads(body)
    assert {k: payload[k] for k in ("format", "seed", "width", "height", "steps", "scheduler", "backend")} == {
        "format": "png", "seed": 5, "width": SIZE, "height": SIZE, "steps": 2, "scheduler": "ddim",
        "backend": "onnxruntime-cpu"}
    images = [image(base64.b64decode(b)) for b in payload["images"]]
    assert len(images) == 2 and all(im.size == (SIZE, SIZE) for im in images)
    # image i starts from row i of the seed's noise: the first is the one image the seed makes alone
    alone = image(call(server, {"prompt": "a cat", "steps": 2, "seed": 5})[2])
    assert np.abs(np.asarray(alone, dtype=int) - np.asarray(images[0], dtype=int)).max() <= 1
    assert np.asarray(images[0]).tolist() != np.asarray(images[1]).tolist()


OK = {"prompt": "a cat", "steps": 1}
REFUSED = [  # (body, status, the field the 422 names)
    (b'{"prompt": "a cat",', 400, None),
    (b"\xff\xfe{\x00}\x00", 400, None),  # UTF-16: JSON is UTF-8
    (b"", 400, None),
    (b'{"prompt": "\\ud800"}', 400, None),  # a lone surrogate
    (b"[" * 300 + b"]" * 300, 400, None),  # nested past what the parser reads
    (b'{"steps": 1' + b"0" * 5000 + b"}", 400, None),
    (b"[]", 422, "body"),
    (b"null", 422, "body"),
    ({**OK, "bogus": 1}, 422, "bogus"),
    ({"steps": 1}, 422, "prompt"),
    ({**OK, "prompt": 7}, 422, "prompt"),
    ({**OK, "prompt": "x" * 1001}, 422, "prompt"),
    ({**OK, "negative_prompt": 5}, 422, "negative_prompt"),
    ({**OK, "steps": "2"}, 422, "steps"),
    ({**OK, "steps": 2.0}, 422, "steps"),
    ({**OK, "steps": True}, 422, "steps"),
    ({**OK, "steps": None}, 422, "steps"),
    ({**OK, "steps": 0}, 422, "steps"),
    ({**OK, "steps": 101}, 422, "steps"),
    ({**OK, "guidance_scale": -1}, 422, "guidance_scale"),
    ({**OK, "guidance_scale": 51}, 422, "guidance_scale"),
    ({**OK, "guidance_scale": "7"}, 422, "guidance_scale"),
    (b'{"prompt": "a", "steps": 1, "guidance_scale": NaN}', 422, "guidance_scale"),
    (b'{"prompt": "a", "steps": 1, "guidance_scale": 1' + b"0" * 400 + b"}", 422, "guidance_scale"),
    ({**OK, "seed": -1}, 422, "seed"),
    ({**OK, "seed": 2**32}, 422, "seed"),
    ({**OK, "seed": 1.5}, 422, "seed"),
    (b'{"prompt": "a", "steps": 1, "seed": 1e999}', 422, "seed"),
    ({**OK, "scheduler": "plms"}, 422, "scheduler"),
    ({**OK, "height": 12}, 422, "height"),
    ({**OK, "width": 4096}, 422, "width"),
    ({**OK, "num_images": 0}, 422, "num_images"),
    ({**OK, "num_images": 3}, 422, "num_images"),
    ({**OK, "num_images": 2}, 422, "format"),  # png is one image
    ({**OK, "format": "jpeg"}, 422, "format"),
    ({**OK, "steps": 60, "num_images": 2, "format": "base64"}, 422, "body"),  # 2 x 60 steps: over the budget
]


@pytest.mark.parametrize("body, status, field", REFUSED, ids=[f"{s}-{f or 'json'}-{i}" for i, (_, s, f) in enumerate(REFUSED)])
def test_refusals(server, body, status, field):
    got, headers, raw = call(server, body)
    assert got == status, (got, raw[:300])
    payload = error_of(got, headers, raw)
    if field is not None:
        assert field in payload["fields"] and payload["error"].startswith(f"{field}: "), payload


def test_every_field_at_fault_is_named(server):
    status, headers, body = call(server, {"prompt": "a", "steps": "x", "seed": -1, "bogus": 1})
    assert status == 422 and set(error_of(status, headers, body)["fields"]) == {"steps", "seed", "bogus"}


def chunked(body: bytes, size: int = 7) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + size]), body[i:i + size]) for i in range(0, len(body), size)) + b"0\r\n\r\n"


HEAD = b"POST /generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
FRAMING = [  # (request bytes, status); the HTTP layer's own 400 may be plain text (uvicorn's)
    (HEAD + b"Content-Length: -1\r\n\r\n" + json.dumps(OK).encode(), 400),
    (HEAD + b"Content-Length: abc\r\n\r\n{}", 400),
    (HEAD + b"Content-Length: 2, 3\r\n\r\n{}", 400),
    (HEAD + b"\r\n" + json.dumps(OK).encode(), 411),
    (HEAD + b"Content-Length: 1000000000\r\n\r\n{}", 413),
    (HEAD + b"Content-Length: 20000\r\n\r\n" + b" " * 20000, 413),
    (HEAD + b"Transfer-Encoding: chunked\r\n\r\n" + chunked(json.dumps(OK).encode()), 200),
    (HEAD + b"Transfer-Encoding: chunked\r\n\r\n" + chunked(b" " * 17000, 4096), 413),
    (HEAD + b"Transfer-Encoding: chunked\r\n\r\nzz\r\nab\r\n0\r\n\r\n", 400),
    (HEAD + b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n" + chunked(json.dumps(OK).encode()), 200),
    (HEAD + b"Transfer-Encoding: gzip\r\n\r\n" + json.dumps(OK).encode(), 400),
    (b"GET /nowhere HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", 404),
    (b"GET /generate HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", 405),
    (b"POST /health HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\n\r\n", 405),
]


@pytest.mark.parametrize("data, status", FRAMING, ids=[f"{s}-{i}" for i, (_, s) in enumerate(FRAMING)])
def test_framing_and_paths(server, data, status):
    reply = exchange(server.port, data, timeout=30)
    assert reply.status == status, (reply.status, reply.body[:300])
    if status in (404, 405, 411, 413):
        error_of(reply.status, reply.headers, reply.body)
    if status == 405:
        assert "POST" in reply.headers["allow"] or "GET" in reply.headers["allow"]
    assert exchange(server.port, GET_HEALTH).status == 200


def test_a_body_that_stalls_is_408(server):
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(HEAD + b"Content-Length: 100\r\n\r\n{\"prompt\"")
        started = time.monotonic()
        reply = read_reply(sock)
    assert reply.status == 408 and READ_TIMEOUT_S - 0.1 < time.monotonic() - started < READ_TIMEOUT_S + 5
    assert "did not arrive" in error_of(reply.status, reply.headers, reply.body)["error"]


def wait_for(server, condition, timeout: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        health = json.loads(exchange(server.port, GET_HEALTH).body)
        if condition(health):
            return health
        assert time.monotonic() < deadline, health
        time.sleep(0.005)


def test_a_full_queue_is_503_with_retry_after(server):
    """One request running (100 steps, about 1.5 s here), one waiting (--queue-size 1): the next is refused at
    once, with Retry-After; /health answers all along; the two accepted ones are served."""
    results: list = []

    def send(steps: int) -> threading.Thread:
        thread = threading.Thread(target=lambda: results.append(call(server, {"prompt": "a", "steps": steps, "seed": 0})))
        thread.start()
        return thread

    running_ = send(100)
    wait_for(server, lambda h: h["busy"])
    waiting = send(100)
    health = wait_for(server, lambda h: h["queue_depth"] == 1)
    assert health["busy"]
    status, headers, body = call(server, OK)
    assert status == 503 and int(headers["retry-after"]) >= 1, (status, body)
    assert "queue full" in error_of(status, headers, body)["error"]
    running_.join(120)
    waiting.join(120)
    assert [r[0] for r in results] == [200, 200]


@pytest.fixture(params=SERVERS)
def impatient(request, started):
    return started(request.param, "--timeout-s", "0.001")


def test_past_the_timeout_is_504(impatient):
    status, headers, body = call(impatient, {"prompt": "a", "steps": 50})
    assert status == 504 and "timed out after 0.001 s" in error_of(status, headers, body)["error"]
    assert wait_for(impatient, lambda h: not h["busy"] and h["queue_depth"] == 0)["status"] == "ok"
