"""The report: report.json, report.md and plots, assembled from the stage outputs."""

from deploykit.report.build import StageOutput, assemble, check_gates, merge_device_runs, write_outputs

__all__ = ["StageOutput", "assemble", "check_gates", "merge_device_runs", "write_outputs"]
