"""HTTP/1.1 over raw sockets, for tests that send what no HTTP client library would, and the real server
configuration `deploykit serve` runs under, on 127.0.0.1 and a port the OS picks."""

from __future__ import annotations

import select
import socket
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import uvicorn

from deploykit.serve.server import uvicorn_config


@contextmanager
def serving(app):
    """``app`` (from create_app) under uvicorn as `deploykit serve` configures it; yields (url, port)."""
    server = uvicorn.Server(uvicorn_config(app, app.state.config, port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", port
    finally:
        server.should_exit = True
        thread.join(10)


@dataclass
class Reply:
    status: int | None  # None: the server closed the connection without an answer
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    closed: bool = False  # the server closed the connection after this reply


def read_reply(sock: socket.socket, head_request: bool = False) -> Reply:
    """One response from ``sock`` (its body by Content-Length), and whether the server then closed.
    Interim answers (100 Continue) are skipped; ``head_request``: the answer to HEAD has no body."""
    data = b""
    while True:
        while b"\r\n\r\n" not in data:
            chunk = _recv(sock)
            if not chunk:
                return Reply(None, closed=True)
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        if not 100 <= int(lines[0].split()[1]) < 200:
            break
        data = body
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    if head_request:
        return Reply(int(lines[0].split()[1]), headers, b"", headers.get("connection", "").lower() == "close")
    closed = headers.get("connection", "").lower() == "close"
    length = int(headers["content-length"]) if "content-length" in headers else None  # None: the body ends at close
    while length is None or len(body) < length:
        chunk = _recv(sock)
        if not chunk:
            break
        body += chunk
    if closed and length is not None:
        assert not _recv(sock), "the server said Connection: close and sent more"
    return Reply(int(lines[0].split()[1]), headers, body, closed)


def _recv(sock: socket.socket) -> bytes:
    try:
        return sock.recv(65536)
    except ConnectionResetError:
        return b""


def exchange(port: int, data: bytes, timeout: float = 10.0) -> Reply:
    """Send ``data`` on a new connection and read one reply."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        try:
            sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):  # the server refused before reading it all
            pass
        return read_reply(sock, head_request=data.startswith(b"HEAD "))


def trickle(sock: socket.socket, pieces: list[bytes], every_s: float = 0.02) -> None:
    """Send ``pieces`` one every ``every_s`` seconds, stopping as soon as the server answers or hangs up
    (a byte sent to a closed socket draws a reset, which can discard the answer before it is read)."""
    for piece in pieces:
        if select.select([sock], [], [], every_s)[0]:
            return
        try:
            sock.sendall(piece)
        except (BrokenPipeError, ConnectionResetError):
            return


def post(path: str, body: bytes, *headers: str, length: int | None = -1) -> bytes:
    """A POST request's bytes; ``length`` -1 sends the body's own Content-Length, None sends none."""
    lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", "Content-Type: application/json", *headers]
    if length is not None:
        lines.append(f"Content-Length: {len(body) if length == -1 else length}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


GET_HEALTH = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"


def slow_crowd(port: int, clients: int = 30) -> tuple[list[int | None], int]:
    """``clients`` connections trickling a byte every 10 ms: a third each a body (Content-Length), chunks, and
    headers that never end; meanwhile /health is asked every 50 ms and must answer 200. Returns each slow
    client's outcome (a status, None for a connection closed without an answer) and how often /health answered."""
    head = b"POST /generate HTTP/1.1\r\nHost: x\r\n"
    crowd = [(head + b"Content-Length: 200\r\n\r\n", b" " * 200),                       # a body too slow: 408
             (head + b"Transfer-Encoding: chunked\r\n\r\n", b"1\r\n \r\n" * 200),  # chunks too slow: 408
             (head, b"X-Slow: 1\r\n" * 200)]                                              # endless headers: dropped
    outcomes: list[int | None] = []

    def slow(start: bytes, trickled: bytes) -> None:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            sock.sendall(start)
            trickle(sock, [trickled[i:i + 1] for i in range(len(trickled))], every_s=0.01)
            outcomes.append(read_reply(sock).status)

    threads = [threading.Thread(target=slow, args=crowd[i % 3]) for i in range(clients)]
    for t in threads:
        t.start()
    answered = 0
    while any(t.is_alive() for t in threads):
        assert exchange(port, GET_HEALTH, timeout=5).status == 200
        answered += 1
        time.sleep(0.05)
    return outcomes, answered
