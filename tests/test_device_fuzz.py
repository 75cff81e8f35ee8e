"""Fuzzing `run.py serve` (the device's server) over loopback, as tests/test_serve_fuzz.py does `deploykit serve`:
the same malformed requests on raw sockets, against a real `python3 bundle/run.py serve` process.

Every input gets an HTTP answer with a status from the contract (or, for a request that never completes its
headers, a closed connection), never a 500 nor a traceback in the server's log, and the server answers
/health afterwards. CI runs a small, fixed set of examples; a large run is
``DEPLOYKIT_FUZZ_EXAMPLES=5000 pytest tests/test_device_fuzz.py -s`` (random seeds, prints its count).
"""

from __future__ import annotations

import json
import select
import socket
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.device_servers import jetson_artifact, running
from tests.raw_http import GET_HEALTH, exchange, read_reply, slow_crowd
from tests.test_serve_fuzz import ALLOWED, FUZZ, MAX_BODY, READ_TIMEOUT_S, _json, mutated, requests, valid

# what run.py may answer besides the contract's statuses: http.server's own refusals of a request line or
# header block it cannot read (uvicorn answers 400 to all of these)
HTTP_LAYER = {414, 431, 501, 505}
FLAGS = ("--no-warmup", "--max-steps", "3", "--max-body-bytes", str(MAX_BODY), "--read-timeout-s", str(READ_TIMEOUT_S))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    artifact = jetson_artifact(tmp_path_factory)
    with running("run.py serve", artifact, tmp_path_factory.mktemp("fuzz") / "run-py.log", *FLAGS) as server:
        yield server, {"tried": 0}
        assert "Traceback" not in server.output(), server.output()[-5000:]


def check_answer(server, data: bytes) -> None:
    logged = len(server.output())
    reply = exchange(server.port, data, timeout=READ_TIMEOUT_S + 20)
    if reply.status is not None:
        assert reply.status in ALLOWED | HTTP_LAYER, (reply.status, reply.body[:300], data[:300])
        if reply.status != 200 and reply.body:  # every refusal is the contract's JSON (a HEAD answer has no body)
            assert json.loads(reply.body)["error"], reply.body
    health = exchange(server.port, GET_HEALTH)
    assert health.status == 200, health
    new = server.output()[logged:]
    assert "Traceback" not in new, (new[-3000:], data[:300])


@FUZZ
@given(data=requests())
def test_malformed_requests_get_a_clean_answer_and_the_server_stays_up(server, data):
    server, count = server
    count["tried"] += 1
    check_answer(server, data)


@FUZZ
@given(body=st.one_of(valid.map(_json), mutated.map(_json)))
def test_any_json_body_gets_the_contract_status(server, body):
    server, count = server
    count["tried"] += 1
    check_answer(server, b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body) + body)


@pytest.mark.parametrize("data", [
    b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n{}",  # read until the client closed
    b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n{}",  # int('abc'): a traceback
    b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Length: 4000\r\n\r\n" + b"[" * 2000 + b"]" * 2000,  # RecursionError
    b"POST /generate HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nab\r\n0\r\n\r\n",
    b"GET /health HTTP/2.0\r\n\r\n", b"\xff\xfe garbage\r\n\r\n", b"GET /health\r\n\r\n",
], ids=["negative-length", "text-length", "deep-json", "bad-chunk", "http2", "junk", "http0.9"])
def test_what_broke_it_before(server, data):
    """Inputs the unfixed run.py hung on (a negative length read until the client gave up) or logged a traceback
    for; now each is answered and the server stays up."""
    server, count = server
    count["tried"] += 1
    check_answer(server, data)
    reply = exchange(server.port, data, timeout=READ_TIMEOUT_S + 20)
    assert reply.status in (400, 505), reply


def test_fuzz_count(server):
    """Says how many inputs the tests above sent (the large run's figure)."""
    print(f"\nrun.py serve fuzz: {server[1]['tried']} inputs sent")


def test_slow_clients_never_block_health(server):
    """A crowd trickling headers and bodies: each is answered 408 or dropped, and /health answers throughout."""
    server, _ = server
    outcomes, answered = slow_crowd(server.port)
    assert answered > 0 and outcomes.count(408) == 20 and outcomes.count(None) == 10, outcomes
    assert "Traceback" not in server.output()


def test_connections_beyond_the_pool_get_503_at_once(tmp_path_factory):
    """--max-connections 2: two idle connections are served (each holds a thread until its read deadline), two
    more wait for a thread, and the next is answered 503 with Retry-After at once; when they go, /health answers."""
    artifact = jetson_artifact(tmp_path_factory)
    flags = ("--no-warmup", "--read-timeout-s", "10", "--max-connections", "2")
    with running("run.py serve", artifact, tmp_path_factory.mktemp("pool") / "run-py.log", *flags) as server:
        time.sleep(1.5)  # the start-up's /health connection is closed by now (LINGER_S at most)
        held: list[socket.socket] = []
        try:
            for _ in range(8):
                sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
                if select.select([sock], [], [], 0.5)[0]:  # answered at once: refused
                    reply = read_reply(sock)
                    sock.close()
                    break
                held.append(sock)
            assert len(held) == 4, len(held)
            assert reply.status == 503 and reply.headers["retry-after"] == "1" and json.loads(reply.body)["error"]
        finally:
            for sock in held:
                sock.close()
        deadline = time.monotonic() + 30
        while exchange(server.port, GET_HEALTH, timeout=10).status != 200:
            assert time.monotonic() < deadline
            time.sleep(0.2)
        assert "Traceback" not in server.output()
