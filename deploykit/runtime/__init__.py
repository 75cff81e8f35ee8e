"""What a device needs to run an artifact: backends, the sampling loop, and :class:`Pipeline`. Imports no training code."""

from deploykit.runtime.backends import OnnxRuntimeBackend, TorchBackend, cpu_threads
from deploykit.runtime.pipeline import SCHEDULERS, Pipeline, Request, RequestError
from deploykit.runtime.sampling import make_pipeline_scheduler, make_scheduler, sample, sample_batched

__all__ = ["OnnxRuntimeBackend", "Pipeline", "Request", "RequestError", "SCHEDULERS", "TorchBackend", "cpu_threads",
           "make_pipeline_scheduler", "make_scheduler", "sample", "sample_batched"]
