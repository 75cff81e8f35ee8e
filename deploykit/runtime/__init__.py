"""What a device needs to run an artifact: backends and the sampling loop. Imports no training code."""

from deploykit.runtime.backends import OnnxRuntimeBackend, TorchBackend, cpu_threads
from deploykit.runtime.sampling import make_pipeline_scheduler, make_scheduler, sample, sample_batched

__all__ = ["OnnxRuntimeBackend", "TorchBackend", "cpu_threads", "make_pipeline_scheduler", "make_scheduler", "sample", "sample_batched"]
