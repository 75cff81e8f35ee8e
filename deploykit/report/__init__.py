"""The report: report.json, report.md and plots, assembled from the stage outputs."""

from deploykit.report.build import assemble, write_outputs

__all__ = ["assemble", "write_outputs"]
