"""Latency measurement."""

from deploykit.bench.latency import Latency, PairedLatency, measure_group, measure_group_against, measure_pair

__all__ = ["Latency", "PairedLatency", "measure_group", "measure_group_against", "measure_pair"]
