"""Run the app under uvicorn: loopback unless told otherwise."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from deploykit.runtime.pipeline import Pipeline
from deploykit.serve.app import create_app
from deploykit.serve.schema import ServeConfig


def run_server(artifact: str | Path, host: str = "127.0.0.1", port: int = 8000, backend: str | None = None,
               config: ServeConfig | None = None, log_level: str = "info",
               on_loaded: Callable[[Pipeline], None] | None = None) -> None:
    """Load ``artifact`` (raises InputError before binding anything if it is not a sound artifact) and serve it."""
    import uvicorn

    config = config or ServeConfig()
    pipeline = Pipeline.from_artifact(artifact, backend)
    if on_loaded is not None:
        on_loaded(pipeline)
    # Connections beyond the queue and the batch get uvicorn's own 503 before any work: a flood of
    # clients then costs sockets, not memory. Headroom keeps /health and /metrics reachable.
    limit = config.queue_size + config.max_batch + 32
    uvicorn.run(create_app(pipeline, config), host=host, port=port, log_level=log_level, limit_concurrency=limit,
                timeout_graceful_shutdown=5)
