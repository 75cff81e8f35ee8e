"""`deploykit serve ARTIFACT`: an HTTP server around :class:`deploykit.runtime.Pipeline`."""

from deploykit.serve.app import create_app
from deploykit.serve.schema import ServeConfig
from deploykit.serve.server import run_server

__all__ = ["ServeConfig", "create_app", "run_server"]
