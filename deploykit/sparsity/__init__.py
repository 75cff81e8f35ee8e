"""2:4 semi-structured sparsity: masks that persist through later stages, and cuSPARSELt kernels to run them.

``sparsify(model, SparsityConfig(...), forward_loop=None) -> masks`` chooses the masks and zeroes the
pruned weights in place; ``apply_masks`` re-zeroes them after an optimizer step; ``check_2to4``
verifies a model or state dict; ``save_masks`` / ``load_masks`` store them beside the weights.
``to_semi_structured`` (CUDA) runs the masked Linear and 1x1 Conv2d layers on cuSPARSELt.
"""

from deploykit.sparsity.masks import (
    DEFAULT_EXCLUDE,
    DEFAULT_MIN_FEATURES,
    MASKS_FILE,
    METHODS,
    Eligibility,
    SparsityConfig,
    Violation,
    apply_masks,
    check_2to4,
    eligible_layers,
    is_2to4,
    load_masks,
    magnitude_mask,
    masks_summary,
    save_masks,
    sparsify,
)
from deploykit.sparsity.semi_structured import (
    SemiStructuredConv1x1,
    SemiStructuredPlan,
    plan_semi_structured,
    require_cuda,
    shape_constraints,
    to_semi_structured,
)

__all__ = ["DEFAULT_EXCLUDE", "DEFAULT_MIN_FEATURES", "MASKS_FILE", "METHODS", "Eligibility", "SemiStructuredConv1x1",
           "SemiStructuredPlan", "SparsityConfig", "Violation", "apply_masks", "check_2to4", "eligible_layers", "is_2to4",
           "load_masks", "magnitude_mask", "masks_summary", "plan_semi_structured", "require_cuda", "save_masks",
           "shape_constraints", "sparsify", "to_semi_structured"]
