"""The HTTP face of a :class:`~deploykit.runtime.Pipeline`: POST /generate, GET /health, GET /metrics.

Status codes: 200 images; 400 a body that is not JSON; 413 a body over ``max_body_bytes``; 422 a
request that names a wrong field, type or value (the message names the field); 503 the queue is full
(with ``Retry-After``) or the server is stopping; 504 the request's ``timeout_s`` passed; 500 the model
failed on this batch (the server goes on serving).
"""

from __future__ import annotations

import asyncio
import base64
import io
import math
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError

from deploykit.runtime.pipeline import Pipeline, RequestError
from deploykit.serve.batcher import Batcher, QueueFull
from deploykit.serve.metrics import Metrics
from deploykit.serve.schema import GenerateBody, ServeConfig, error_messages, parse


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


async def _read_body(request: Request, limit: int) -> bytes:
    too_big = _Refusal(413, f"request body over {limit} bytes")
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise too_big
    body = bytearray()
    async for chunk in request.stream():  # chunked bodies have no length to check up front
        body += chunk
        if len(body) > limit:
            raise too_big
    return bytes(body)


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

    async def generate(body: GenerateBody) -> Response:
        if body.format == "png" and body.num_images > 1:
            raise _Refusal(422, "format: png returns one image; use format base64 for num_images > 1",
                           {"format": "png returns one image; use base64 for num_images > 1"})
        try:
            request = pipeline.prepare(body.to_request())
        except RequestError as e:
            raise _Refusal(422, str(e), {e.field: str(e).removeprefix(f"{e.field}: ")}) from None
        try:
            future = batcher.submit(request, request.batch_key(), request.num_images)
        except QueueFull:
            retry = max(1, math.ceil(last_batch["seconds"] * (config.queue_size / config.max_batch + 1)))
            raise _Refusal(503, f"queue full ({config.queue_size} requests waiting); retry later",
                           headers={"Retry-After": str(retry)}) from None
        except RuntimeError:
            raise _Refusal(503, "the server is stopping") from None
        try:
            images = await asyncio.wait_for(asyncio.wrap_future(future), config.timeout_s)
        except asyncio.TimeoutError:
            future.cancel()
            raise _Refusal(504, f"timed out after {config.timeout_s:g} s (queueing included); the request was "
                                "cancelled") from None
        except asyncio.CancelledError:
            future.cancel()  # the client went away: do not spend model time on it
            raise
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
            raw = await _read_body(request, config.max_body_bytes)
            try:
                body = parse(raw, config)
            except ValidationError as e:
                if any(err["type"] == "json_invalid" for err in e.errors()):
                    raise _Refusal(400, "the body is not valid JSON") from None
                fields = error_messages(e)
                raise _Refusal(422, "; ".join(f"{k}: {v}" for k, v in fields.items()), fields) from None
            response = await generate(body)
        except _Refusal as r:
            response = _json_error(r)
        status = response.status_code
        metrics.observe_request(status, time.perf_counter() - started)
        return response

    @app.get("/health")
    async def health() -> JSONResponse:
        ok = batcher.alive
        return JSONResponse({"status": "ok" if ok else "stopped", **pipeline.info(), "queue_depth": batcher.depth,
                             "queue_size": config.queue_size, "max_batch": config.max_batch, "busy": batcher.busy},
                            status_code=200 if ok else 503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
