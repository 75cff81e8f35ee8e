"""The registered stages, in the order they run: one module per stage, one line here.

The recipe's ``stages:`` entries validate against the registered stages' configs, the order a recipe
must list them in is this registry's order, and the runner and report work from the registered specs.
"""

from deploykit.stages.base import StageContext, StageSpec
from deploykit.stages.bench import BENCH
from deploykit.stages.bundle import BUNDLE
from deploykit.stages.decoder import DECODER
from deploykit.stages.distill import DISTILL
from deploykit.stages.engine import ENGINE
from deploykit.stages.eval import EVAL
from deploykit.stages.export import EXPORT
from deploykit.stages.prune import PRUNE
from deploykit.stages.quantize import QUANTIZE
from deploykit.stages.sparsify import SPARSIFY
from deploykit.stages.teacher import TEACHER
from deploykit.stages.verify import VERIFY

STAGES: dict[str, StageSpec] = {}


def register(spec: StageSpec) -> StageSpec:
    """Add ``spec`` at the end of the run order."""
    if spec.name in STAGES:
        raise ValueError(f"a stage named {spec.name!r} is registered already")
    tag = spec.config.model_fields.get("stage")
    if not spec.implicit and (tag is None or tag.default != spec.name):
        raise ValueError(f"stage {spec.name}: its config {spec.config.__name__} needs `stage: Literal[{spec.name!r}]` "
                         "with that default (recipes name a stage by it)")
    STAGES[spec.name] = spec
    return spec


for _spec in (TEACHER, PRUNE, SPARSIFY, DISTILL, DECODER, EXPORT, QUANTIZE, BUNDLE, ENGINE, VERIFY, BENCH, EVAL):
    register(_spec)

__all__ = ["STAGES", "StageContext", "StageSpec", "register"]
