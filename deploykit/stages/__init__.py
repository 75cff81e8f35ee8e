"""One thin module per stage: read inputs from the artifact, call the algorithm, write outputs."""

from deploykit.stages.base import StageContext, StageSpec
from deploykit.stages.bench import BENCH
from deploykit.stages.bundle import BUNDLE
from deploykit.stages.distill import DISTILL
from deploykit.stages.engine import ENGINE
from deploykit.stages.eval import EVAL
from deploykit.stages.export import EXPORT
from deploykit.stages.prune import PRUNE
from deploykit.stages.quantize import QUANTIZE
from deploykit.stages.sparsify import SPARSIFY
from deploykit.stages.teacher import TEACHER
from deploykit.stages.verify import VERIFY

STAGES: dict[str, StageSpec] = {s.name: s for s in (TEACHER, PRUNE, SPARSIFY, DISTILL, EXPORT, QUANTIZE, BUNDLE, ENGINE,
                                                          VERIFY, BENCH, EVAL)}

__all__ = ["STAGES", "StageContext", "StageSpec"]
