"""Teachers in, students out: loading, saving and rebuilding models without pickle."""

from deploykit.models.architecture import build, describe, load_model, save_model
from deploykit.models.ops import Macs, count_macs, count_params, measure_macs
from deploykit.models.teacher import Teacher, load_teacher

__all__ = ["Macs", "Teacher", "build", "count_macs", "count_params", "describe", "load_model", "load_teacher", "measure_macs",
           "save_model"]
