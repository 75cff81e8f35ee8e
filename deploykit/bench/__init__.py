"""Measurement: latency (interleaved, paired), the machine it ran on, and the roofline model beside it."""

from deploykit.bench.latency import (
    Latency,
    PairedLatency,
    Rounds,
    measure_group,
    measure_group_against,
    measure_pair,
    measure_rounds,
)

__all__ = ["Latency", "PairedLatency", "Rounds", "measure_group", "measure_group_against", "measure_pair", "measure_rounds"]
