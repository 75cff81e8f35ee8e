"""Fuzzing `deploykit serve` over loopback: malformed requests on raw sockets, against the real uvicorn set-up.

Every input gets an HTTP answer with a status from the contract (or, for a request that never
completes its headers, a closed connection), never a 500 nor a logged traceback, and the server
answers /health afterwards. CI runs a small, fixed set of examples; a large run is
``DEPLOYKIT_FUZZ_EXAMPLES=5000 pytest tests/test_serve_fuzz.py`` (random seeds, prints its count).
"""

from __future__ import annotations

import json
import logging
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deploykit.serve import ServeConfig, create_app
from tests.raw_http import GET_HEALTH, exchange, serving, slow_crowd

EXAMPLES = int(os.environ.get("DEPLOYKIT_FUZZ_EXAMPLES", "0"))
FUZZ = settings(max_examples=EXAMPLES or 40, deadline=None, derandomize=not EXAMPLES, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])
READ_TIMEOUT_S = 0.5
MAX_BODY = 4096
# what the server may answer: the app's contract, and uvicorn's 400 for what h11 cannot parse
ALLOWED = {200, 400, 404, 405, 408, 411, 413, 422, 503}
APP_ERRORS = {408, 411, 413, 422}  # always the app's JSON {"error": ...}


class Errors(logging.Handler):
    """Collects what the server logs at ERROR (uvicorn's "Exception in ASGI application" and the like)."""

    def __init__(self):
        super().__init__(logging.ERROR)
        self.records: list[str] = []

    def emit(self, record):
        self.records.append(self.format(record))


@pytest.fixture(scope="module")
def server(zoo_serve_artifact):
    from deploykit.runtime import Pipeline

    app = create_app(Pipeline.from_artifact(zoo_serve_artifact),
                     ServeConfig(max_steps=3, max_body_bytes=MAX_BODY, read_timeout_s=READ_TIMEOUT_S, warmup=False))
    errors = Errors()
    loggers = [logging.getLogger(name) for name in ("uvicorn.error", "asyncio")]
    with serving(app) as (url, port):
        for logger in loggers:  # once uvicorn has configured its loggers, which drops the handlers they had
            logger.addHandler(errors)
        yield port, errors, {"tried": 0}
    for logger in loggers:
        logger.removeHandler(errors)


# -- what a client may send --------------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-10**40, max_value=10**40) | st.floats() | st.text(max_size=50),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=10)
FIELDS = ["prompt", "negative_prompt", "steps", "guidance_scale", "seed", "scheduler", "height", "width", "num_images",
          "format"]
valid = st.fixed_dictionaries({}, optional={"steps": st.integers(1, 3), "seed": st.integers(0, 2**32 - 1),
                                            "scheduler": st.sampled_from(["ddim", "dpm-solver++", "euler"]),
                                            "format": st.just("base64"), "num_images": st.integers(1, 2)})
mutated = st.builds(lambda base, extra: {**base, **extra}, valid,
                    st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=8), json_values, max_size=3))


def _json(value) -> bytes:
    return json.dumps(value, allow_nan=True).encode()


bodies = st.one_of(
    valid.map(_json), mutated.map(_json), json_values.map(_json),
    st.binary(max_size=300),
    st.text(max_size=200).map(lambda t: t.encode("utf-8", "surrogatepass")),
    st.sampled_from([b'{"steps": 1' + b"0" * 5000 + b"}", b'{"seed": 1e999}', b'{"steps": NaN}', b'{"prompt": "\\ud800"}',
                     b'{"steps": 2, "steps": "x"}', b"[" * 3000 + b"]" * 3000, b'{"a": ' * 600 + b"1" + b"}" * 600,
                     b"\xef\xbb\xbf{}", b'{"prompt": "' + "é".encode() * 2000 + b'"}', b"", b"null", b"{}"]),
)

methods = st.sampled_from([b"POST", b"GET", b"PUT", b"DELETE", b"HEAD", b"OPTIONS", b"post", b"P\x00ST", b"CONNECT"]) \
    | st.binary(min_size=1, max_size=10)
targets = st.sampled_from([b"/generate", b"/health", b"/metrics", b"/gen%65rate", b"/generate?x=1", b"*", b"/../..",
                           b"http://127.0.0.1/generate", b"/" + b"a" * 20000, b"/\xff", b"//generate", b""]) \
    | st.binary(max_size=30)
versions = st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"HTTP/0.9", b"HTTP/1.1 extra", b"", b"HTTP/1.x"])
header_names = st.sampled_from([b"X-A", b"Content-Type", b"Expect", b"Connection", b"Host", b"Bad Name", b"\xff",
                                b"Transfer-Encoding", b""]) | st.binary(min_size=1, max_size=12)
header_values = st.sampled_from([b"application/json", b"100-continue", b"close", b"keep-alive", b"\x00", b"a\rb",
                                 b"x" * 20000, b"chunked, gzip", b"gzip"]) | st.binary(max_size=30)
extra_headers = st.lists(st.tuples(header_names, header_values), max_size=4) \
    | st.just([(b"X-Many-%d" % i, b"1") for i in range(2000)])


def chunked(body: bytes, sizes: list[int]) -> bytes:
    out, i = b"", 0
    for size in sizes:
        piece = body[i:i + size]
        if piece:
            out += b"%x\r\n" % len(piece) + piece + b"\r\n"
        i += size
    if i < len(body):
        out += b"%x\r\n" % (len(body) - i) + body[i:] + b"\r\n"
    return out + b"0\r\n\r\n"


@st.composite
def framed(draw, body: bytes) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """Headers that say how long ``body`` is (honestly or not), and the bytes that follow them."""
    how = draw(st.sampled_from(["length", "none", "short", "long", "bad-length", "two-lengths", "chunked",
                                "bad-chunked", "oversized-chunked", "chunked-and-length"]))
    if how == "length":
        return [(b"Content-Length", b"%d" % len(body))], body
    if how == "none":
        return [], body
    if how == "short":  # announces more than it sends: the body-read deadline ends it
        return [(b"Content-Length", b"%d" % (len(body) + draw(st.integers(1, 10**6))))], body
    if how == "long":  # sends more than it announces: the rest is the next (broken) request
        return [(b"Content-Length", b"%d" % max(0, len(body) - draw(st.integers(1, 5))))], body
    if how == "bad-length":
        value = draw(st.sampled_from([b"-1", b"-0", b"abc", b"", b"1e3", b"0x10", b" 12", b"1" * 25, b"%d" % 10**15,
                                      "١٢".encode()]))
        return [(b"Content-Length", value)], body
    if how == "two-lengths":
        return [(b"Content-Length", b"%d" % len(body)), (b"Content-Length", b"%d" % (len(body) + 1))], body
    sizes = draw(st.lists(st.integers(1, 64), max_size=8))
    if how == "chunked":
        return [(b"Transfer-Encoding", b"chunked")], chunked(body, sizes)
    if how == "bad-chunked":
        junk = draw(st.sampled_from([b"zz\r\nab\r\n0\r\n\r\n", b"-5\r\nabcde\r\n0\r\n\r\n", b"5\r\nab\r\n0\r\n\r\n",
                                     b"ffffffffffffffffffff\r\nab\r\n", b"5;ext=\x00\r\nabcde\r\n0\r\n\r\n", b"5\r\nabcde",
                                     b"3\nabc\n0\n\n", b"0\r\nTrailer: x\r\n\r\n", b"5\r\nabcdeXX0\r\n\r\n"]))
        return [(b"Transfer-Encoding", b"chunked")], junk
    if how == "oversized-chunked":
        return [(b"Transfer-Encoding", b"chunked")], chunked(b"x" * (MAX_BODY + 1), [1024] * 5)
    return [(b"Transfer-Encoding", b"chunked"), (b"Content-Length", b"%d" % len(body))], chunked(body, sizes)


@st.composite
def requests(draw) -> bytes:
    body = draw(bodies)
    framing, payload = draw(framed(body))
    if draw(st.integers(0, 9)) == 0:  # now and then, a broken request line
        line = draw(methods) + b" " + draw(targets) + b" " + draw(versions)
    else:
        line = b"POST " + draw(st.sampled_from([b"/generate", b"/generate", b"/health"])) + b" HTTP/1.1"
    headers = [(b"Host", b"127.0.0.1"), (b"Content-Type", b"application/json"), *framing, *draw(extra_headers)]
    return line + b"\r\n" + b"".join(name + b": " + value + b"\r\n" for name, value in headers) + b"\r\n" + payload


# -- the properties -----------------------------------------------------------------------------------------------

def check_answer(port: int, data: bytes, errors: Errors) -> None:
    before = len(errors.records)
    reply = exchange(port, data, timeout=READ_TIMEOUT_S + 20)
    if reply.status is not None:
        assert reply.status in ALLOWED, (reply.status, reply.body[:300], data[:300])
        if reply.status in APP_ERRORS:
            assert json.loads(reply.body)["error"], reply.body
    health = exchange(port, GET_HEALTH)
    assert health.status == 200, health
    assert errors.records[before:] == [], (errors.records[before:], data[:300])


@FUZZ
@given(data=requests())
def test_malformed_requests_get_a_clean_answer_and_the_server_stays_up(server, data):
    port, errors, count = server
    count["tried"] += 1
    check_answer(port, data, errors)


@FUZZ
@given(body=st.one_of(valid.map(_json), mutated.map(_json)))
def test_any_json_body_gets_the_contract_status(server, body):
    port, errors, count = server
    count["tried"] += 1
    check_answer(port, b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body) + body, errors)


@pytest.mark.parametrize("method", [b"GET /health", b"HEAD /generate", b"POST /health"])
def test_a_malformed_body_the_app_does_not_read_is_answered_without_a_traceback(server, method):
    """The fuzzer's finds: uvicorn's 400 for the body, then the app's own answer on the finished connection
    ("Exception in ASGI application"); and after HEAD, a 400 framed as a HEAD response, which h11 refused."""
    port, errors, count = server
    count["tried"] += 1
    check_answer(port, method + b" HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nab\r\n0\r\n\r\n", errors)


def test_fuzz_count(server):
    """Says how many inputs the fuzz tests above sent (the large run's figure)."""
    print(f"\nserve fuzz: {server[2]['tried']} inputs sent")


def test_slow_clients_never_block_health(server):
    """A crowd trickling headers and bodies: each is answered 408 or dropped, and /health answers throughout."""
    port, errors, _ = server
    outcomes, answered = slow_crowd(port)
    assert answered > 0 and outcomes.count(408) == 20 and outcomes.count(None) == 10, outcomes
    assert errors.records == []


@settings(max_examples=EXAMPLES // 10 or 15, deadline=None, derandomize=not EXAMPLES, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(prompt=st.text(max_size=300) | st.sampled_from(["\ud800", "a\udfffb", "\x00", "\u202e\u0301" * 100, "🚲" * 300]))
def test_any_prompt_text_is_served_or_refused_by_name(sd_text_client, prompt):
    """Whatever a prompt holds (any script, controls, combining marks, lone surrogates), the SD server
    makes an image from it or refuses it with a 4xx naming the field: never a 500."""
    r = sd_text_client.post("/generate", content=json.dumps({"prompt": prompt, "negative_prompt": prompt, "steps": 1}),
                            headers={"content-type": "application/json"})
    assert r.status_code in (200, 400, 422), (r.status_code, r.text, prompt)
    if r.status_code == 422:
        assert set(r.json()["fields"]) <= {"prompt", "negative_prompt"}, r.text


@pytest.fixture(scope="module")
def sd_text_client(sd_pipeline):
    from fastapi.testclient import TestClient

    with TestClient(create_app(sd_pipeline, ServeConfig(max_prompt_chars=400, warmup=False))) as client:
        yield client
