"""The report: report.json, report.md and plots, assembled from the stage outputs."""

from deploykit.report.build import assemble, check_quality_gate, write_outputs

__all__ = ["assemble", "check_quality_gate", "write_outputs"]
