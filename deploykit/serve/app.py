"""The HTTP face of a :class:`~deploykit.runtime.Pipeline`: POST /generate, GET /health, GET /metrics.

Status codes: 200 images; 400 a body that is not JSON (or a malformed Content-Length); 408 the body
did not arrive within ``read_timeout_s``; 411 neither Content-Length nor chunked; 413 a body over
``max_body_bytes``; 422 a request that names a wrong field, type or value (the message names the
field), or that would cost more than the compute budget (``max_pixel_steps``); 503 the queue is full
(with ``Retry-After``) or the server is stopping; 504 the request's ``timeout_s`` passed; 500 the
model failed on this batch (the server goes on serving). A refusal that leaves part of the body
unread closes the connection. A client that disconnects while its request waits has the request
dropped from the queue (counted as status 499 in the metrics).
"""

from __future__ import annotations

import asyncio
import base64
import io
import math
import time
from concurrent.futures import CancelledError, Future
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.types import Receive

from deploykit.runtime.pipeline import Pipeline, RequestError
from deploykit.serve.batcher import Batcher, Expired, QueueFull
from deploykit.serve.metrics import Metrics
from deploykit.serve.schema import GenerateBody, ServeConfig, error_messages, parse, pixel_steps

# The rest of a refused body is never read, so the connection cannot carry another request: close it
# rather than drain whatever the client still sends.
CLOSE = {"Connection": "close"}
CLIENT_GONE = 499  # nginx's "client closed request": counted in the metrics, never sent


class _Refusal(Exception):
    def __init__(self, status: int, error: str, fields: dict[str, str] | None = None, headers: dict | None = None):
        self.status, self.error, self.fields, self.headers = status, error, fields, headers


def _json_error(r: _Refusal) -> JSONResponse:
    body = {"error": r.error} | ({"fields": r.fields} if r.fields else {})
    return JSONResponse(body, status_code=r.status, headers=r.headers)


def _png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


async def _read_body(request: Request, limit: int, timeout_s: float) -> bytes:
    """The whole body within ``timeout_s``: a client that stalls or trickles it holds nothing for longer."""
    too_big = _Refusal(413, f"request body over {limit} bytes", headers=CLOSE)
    length = request.headers.get("content-length")
    chunked = "chunked" in request.headers.get("transfer-encoding", "").lower()
    if length is None and not chunked:
        raise _Refusal(411, "a body is required: send Content-Length (or Transfer-Encoding: chunked)", headers=CLOSE)
    if length is not None and not (length.isascii() and length.isdigit()):
        raise _Refusal(400, "Content-Length must be a non-negative integer", headers=CLOSE)
    if length is not None and int(length) > limit:
        raise too_big

    async def collect() -> bytes:
        body = bytearray()
        async for chunk in request.stream():  # chunked bodies have no length to check up front
            body += chunk
            if len(body) > limit:
                raise too_big
        return bytes(body)

    try:
        return await asyncio.wait_for(collect(), timeout_s)
    except asyncio.TimeoutError:
        raise _Refusal(408, f"the request body did not arrive within {timeout_s:g} s", headers=CLOSE) from None
    except ClientDisconnect:
        raise _Refusal(CLIENT_GONE, "the client closed the connection before its body ended") from None


async def _disconnected(receive: Receive) -> None:
    """Returns when the client closes the connection (the body has been read: nothing else comes first)."""
    try:
        while (await receive())["type"] != "http.disconnect":
            pass
    except Exception:  # noqa: BLE001 - a receive channel that fails is a connection that is gone
        return


async def _wait_for(future: Future, receive: Receive, deadline: float) -> str:
    """Wait for the batcher's ``future``: "done", "gone" (the client disconnected first) or "late" (the
    ``deadline`` passed first). Unless done, the job is cancelled, which drops it if it has not started."""
    result, gone = asyncio.wrap_future(future), asyncio.ensure_future(_disconnected(receive))
    try:
        done, _ = await asyncio.wait({result, gone}, timeout=max(0.0, deadline - time.monotonic()),
                                     return_when=asyncio.FIRST_COMPLETED)
    finally:  # on every way out, the handler's own cancellation (shutdown) included
        gone.cancel()
        if not result.done():
            result.cancel()  # cancels ``future`` too, through wrap_future
    if result in done:
        return "done"
    return "gone" if gone in done else "late"


def create_app(pipeline: Pipeline, config: ServeConfig | None = None) -> FastAPI:
    config = config or ServeConfig()
    last_batch = {"seconds": 1.0}

    def run(requests):
        # runs on the batcher's thread: PNG encoding too, to keep it off the event loop
        return [[_png(im) for im in images] for images in pipeline.run_batch(requests)]

    def on_batch(requests: int, images: int, seconds: float) -> None:
        last_batch["seconds"] = seconds
        metrics.observe_batch(requests, images, seconds)

    batcher = Batcher(run, config.max_batch, config.max_wait_ms, config.queue_size, on_batch=on_batch)
    metrics = Metrics(lambda: batcher.depth, config.max_batch)
    budget = config.pixel_step_budget(pipeline.model.size)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if config.warmup:
            await asyncio.to_thread(pipeline, None if pipeline.kind == "pixel" else "", steps=1, seed=0)
        batcher.start()
        try:
            yield
        finally:
            batcher.stop()

    app = FastAPI(title="deploykit", summary=f"serves {pipeline.root.name} ({pipeline.kind}, {pipeline.backend})",
                  lifespan=lifespan)
    app.state.pipeline, app.state.batcher, app.state.metrics, app.state.config = pipeline, batcher, metrics, config

    def timed_out(dropped: bool) -> _Refusal:
        return _Refusal(504, f"timed out after {config.timeout_s:g} s (queueing included); "
                             + ("the request was dropped from the queue" if dropped else "its batch had already started"))

    async def generate(body: GenerateBody, receive: Receive) -> Response:
        if body.format == "png" and body.num_images > 1:
            raise _Refusal(422, "format: png returns one image; use format base64 for num_images > 1",
                           {"format": "png returns one image; use base64 for num_images > 1"})
        try:
            request = pipeline.prepare(body.to_request())
        except RequestError as e:
            raise _Refusal(422, str(e), {e.field: str(e).removeprefix(f"{e.field}: ")}) from None
        cost = pixel_steps(request)
        if cost > budget:
            why = (f"{request.height}x{request.width} pixels x {request.steps} steps x {request.num_images} images = "
                   f"{cost:,} pixel-steps, over this server's limit of {budget:,} per request (max_pixel_steps)")
            raise _Refusal(422, f"body: {why}", {"body": why})
        deadline = time.monotonic() + config.timeout_s
        try:
            future = batcher.submit(request, request.batch_key(), request.num_images, deadline)
        except QueueFull:
            retry = max(1, math.ceil(last_batch["seconds"] * (config.queue_size / config.max_batch + 1)))
            raise _Refusal(503, f"queue full ({config.queue_size} requests waiting); retry later",
                           headers={"Retry-After": str(retry)}) from None
        except RuntimeError:
            raise _Refusal(503, "the server is stopping") from None
        outcome = await _wait_for(future, receive, deadline)
        if outcome == "gone":
            raise _Refusal(CLIENT_GONE, "the client closed the connection while its request waited")
        if outcome == "late":
            raise timed_out(dropped=future.cancel())  # False once its batch has started: that batch runs to its end
        try:
            images = future.result()
        except Expired:  # the batcher found it past its deadline before this handler did
            raise timed_out(dropped=True) from None
        except CancelledError:  # the batcher is stopping and dropped what waited
            raise _Refusal(503, "the server is stopping") from None
        except Exception as e:  # noqa: BLE001 - the model failed on this batch; the server goes on
            raise _Refusal(500, f"generation failed: {type(e).__name__}: {e}") from None
        headers = {"X-Seed": str(request.seed), "X-Backend": pipeline.backend}
        if body.format == "png":
            return Response(images[0], media_type="image/png", headers=headers)
        return JSONResponse({"images": [base64.b64encode(im).decode("ascii") for im in images], "format": "png",
                             "seed": request.seed, "width": request.width, "height": request.height,
                             "steps": request.steps, "scheduler": request.scheduler, "backend": pipeline.backend},
                            headers=headers)

    @app.post("/generate", openapi_extra={"requestBody": {"required": True, "content": {
        "application/json": {"schema": GenerateBody.model_json_schema()}}}},
        responses={200: {"content": {"image/png": {}}, "description": "image/png (format png) or JSON (base64)"}})
    async def generate_endpoint(request: Request) -> Response:
        started = time.perf_counter()
        status = 500
        try:
            raw = await _read_body(request, config.max_body_bytes, config.read_timeout_s)
            try:
                body = parse(raw, config)
            except ValidationError as e:
                if any(err["type"] == "json_invalid" for err in e.errors()):
                    raise _Refusal(400, "the body is not valid JSON") from None
                fields = error_messages(e)
                raise _Refusal(422, "; ".join(f"{k}: {v}" for k, v in fields.items()), fields) from None
            response = await generate(body, request.receive)
        except _Refusal as r:
            response = _json_error(r)
        status = response.status_code
        metrics.observe_request(status, time.perf_counter() - started)
        return response

    @app.exception_handler(HTTPException)
    async def routing_error(request: Request, e: HTTPException) -> JSONResponse:
        # the router's 404 (no such path) and 405 (another method), as {"error"} like every other refusal
        return JSONResponse({"error": f"{e.detail}: {request.method} {request.url.path}"}, status_code=e.status_code,
                            headers=e.headers)

    @app.get("/health")
    async def health() -> JSONResponse:
        ok = batcher.alive
        return JSONResponse({"status": "ok" if ok else "stopped", **pipeline.info(), "queue_depth": batcher.depth,
                             "queue_size": config.queue_size, "max_batch": config.max_batch, "busy": batcher.busy,
                             "max_pixel_steps": budget},
                            status_code=200 if ok else 503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
