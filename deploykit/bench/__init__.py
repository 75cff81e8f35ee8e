"""Measurement: latency (interleaved, paired), the machine it ran on, and the roofline model beside it."""

from deploykit.bench.latency import Latency, PairedLatency, measure_group, measure_group_against, measure_pair

__all__ = ["Latency", "PairedLatency", "measure_group", "measure_group_against", "measure_pair"]
