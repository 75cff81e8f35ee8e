"""Run 2:4-masked layers on cuSPARSELt through torch's ``SparseSemiStructuredTensor`` (CUDA only).

What torch accepts in ``to_sparse_semi_structured`` (``torch/sparse/semi_structured.py``, read in
torch 2.13; earlier releases check the same and also had fp32 8 x 8 on cuSPARSELt): a 2-d, contiguous
CUDA tensor, each of whose dims is at least and a multiple of the backend's ``sparse_min_rows`` x
``sparse_min_cols`` for its dtype. cuSPARSELt: fp16 / bf16 16 x 16, int8 and fp8 32 x 32; CUTLASS:
fp16 / bf16 32 x 64, int8 16 x 128, fp32 32 x 32. For a linear weight (out, in) that is
``out % 16 == 0 and in % 16 == 0`` in fp16 on cuSPARSELt. The dense operand (the activations) is
padded by torch to multiples of ``dense_min_rows`` x ``dense_min_cols`` (8 x 8 in fp16), so any token
count works. The table is read from the installed torch at run time.

Which layers convert (:func:`plan_semi_structured`, pure shape logic that runs anywhere):
- ``nn.Linear`` whose weight is 2:4 along ``in`` and fits the table: its weight becomes the
  semi-structured tensor and ``F.linear`` dispatches to cuSPARSELt.
- ``nn.Conv2d`` 1x1, stride 1, no padding, ungrouped (SD's ``proj_in`` / ``proj_out`` where
  ``use_linear_projection`` is False, the ResNet ``conv_shortcut``): replaced by
  :class:`SemiStructuredConv1x1`, a linear over (N*H*W, C) between two layout copies (NCHW to tokens
  and back; a few microseconds at SD's sizes, fused away by torch.compile).
- Other convs stay dense in torch: cuSPARSELt has no convolution; their masks still serve TensorRT.

Why ``_FORCE_CUTLASS = False``: it is torch's process-wide switch between its two 2:4 backends.
cuSPARSELt is the one with Hopper (sm90) kernels and looser fp16 shape rules (16 x 16 against
CUTLASS's 32 x 64); torch's CUTLASS 2:4 kernels are its sm80 (Ampere) ones. The switch is only read inside
``to_sparse_semi_structured``, so it is set for the conversion and restored afterwards.
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from deploykit.errors import DeployKitError, InputError
from deploykit.sparsity.masks import is_2to4

# "dense" is a stand-in: the same layer swaps with the weights left dense (runs anywhere; a control
# that times the 1x1-conv-as-linear rewrite on its own, and lets CPU tests exercise the swap)
BACKENDS = ("cusparselt", "cutlass", "dense")
# torch 2.13's tables, used only where the installed torch has none: (sparse_min_rows, sparse_min_cols)
_FALLBACK_CONSTRAINTS = {
    "cusparselt": {torch.float16: (16, 16), torch.bfloat16: (16, 16), torch.int8: (32, 32)},
    "cutlass": {torch.float16: (32, 64), torch.bfloat16: (32, 64), torch.int8: (16, 128), torch.float32: (32, 32)},
}


def shape_constraints(dtype: torch.dtype = torch.float16, backend: str = "cusparselt") -> tuple[int, int]:
    """(min rows, min cols) of a 2:4 weight (out, in): each dim must be at least and a multiple of these."""
    if backend not in BACKENDS:
        raise InputError(f"semi-structured backend {backend!r} is unknown (known: {', '.join(BACKENDS)})")
    if backend == "dense":  # the stand-in converts what cuSPARSELt would in fp16, whatever the dtype
        backend, dtype = "cusparselt", torch.float16
    try:
        from torch.sparse import SparseSemiStructuredTensorCUSPARSELT, SparseSemiStructuredTensorCUTLASS

        cls = SparseSemiStructuredTensorCUSPARSELT if backend == "cusparselt" else SparseSemiStructuredTensorCUTLASS
        table = {k: (v.sparse_min_rows, v.sparse_min_cols) for k, v in cls._DTYPE_SHAPE_CONSTRAINTS.items()}
    except (ImportError, AttributeError):
        table = _FALLBACK_CONSTRAINTS[backend]
    if dtype not in table:
        raise InputError(f"{backend} has no 2:4 kernels for {dtype} (it has: {', '.join(map(str, table))})")
    return table[dtype]


@dataclass
class SemiStructuredPlan:
    convert: list[str] = field(default_factory=list)         # layers that go sparse
    skipped: dict[str, str] = field(default_factory=dict)    # layer -> why it stays dense
    backend: str = "cusparselt"
    dtype: str = "float16"

    def as_dict(self) -> dict:
        reasons: dict[str, int] = {}
        for why in self.skipped.values():
            key = why.split(":")[0]
            reasons[key] = reasons.get(key, 0) + 1
        return {"backend": self.backend, "dtype": self.dtype, "converted": len(self.convert), "skipped": len(self.skipped),
                "skipped_by_reason": reasons, "converted_layers": list(self.convert), "skipped_layers": dict(self.skipped)}


def _is_pointwise(conv: nn.Conv2d) -> bool:
    return (conv.kernel_size == (1, 1) and conv.stride == (1, 1) and conv.groups == 1 and conv.dilation == (1, 1)
            and conv.padding in ((0, 0), "valid") and conv.padding_mode == "zeros")


def plan_semi_structured(model: nn.Module, dtype: torch.dtype = torch.float16, names: Iterable[str] | None = None,
                         backend: str = "cusparselt", conv1x1: bool = True) -> SemiStructuredPlan:
    """Which layers :func:`to_semi_structured` would convert, and why the others stay dense (runs on CPU).

    ``names``: the layers to consider (e.g. the keys of the masks); default every Linear / Conv2d,
    of which those whose weights are not 2:4 are skipped as dense.
    """
    min_rows, min_cols = shape_constraints(dtype, backend)
    kernels = "cusparselt float16" if backend == "dense" else f"{backend} {str(dtype).removeprefix('torch.')}"
    plan = SemiStructuredPlan(backend=backend, dtype=str(dtype).removeprefix("torch."))
    wanted = None if names is None else set(names)
    for name, m in model.named_modules():
        if wanted is not None and name not in wanted:
            continue
        if isinstance(m, SemiStructuredConv1x1) or _is_semi_structured(getattr(m, "weight", None)):
            plan.skipped[name] = "already semi-structured"
            continue
        if not isinstance(m, (nn.Linear, nn.Conv2d)):
            if wanted is not None:
                plan.skipped[name] = f"not a Linear / Conv2d ({type(m).__name__})"
            continue
        if isinstance(m, nn.Conv2d) and not _is_pointwise(m):
            plan.skipped[name] = (f"conv {m.kernel_size[0]}x{m.kernel_size[1]}: no cuSPARSELt convolution, stays dense "
                                  "in torch (TensorRT can use its mask)")
            continue
        if isinstance(m, nn.Conv2d) and not conv1x1:
            plan.skipped[name] = "1x1 conv: conv1x1=False"
            continue
        out_f, in_f = m.weight.shape[0], m.weight.shape[1]
        if out_f < min_rows or out_f % min_rows or in_f < min_cols or in_f % min_cols:
            plan.skipped[name] = f"shape: weight ({out_f}, {in_f}) not a multiple of ({min_rows}, {min_cols}) for {kernels}"
            continue
        if not is_2to4(m.weight):
            plan.skipped[name] = "dense: weight is not 2:4 (no mask)"
            continue
        plan.convert.append(name)
    if wanted is not None:
        for name in sorted(wanted - set(plan.convert) - set(plan.skipped)):
            plan.skipped[name] = "missing: the model has no such layer"
    return plan


def _is_semi_structured(t) -> bool:
    try:
        from torch.sparse import SparseSemiStructuredTensor
    except ImportError:
        return False
    return isinstance(t, SparseSemiStructuredTensor)


class SemiStructuredConv1x1(nn.Module):
    """A 1x1 convolution run as a linear over (N*H*W, C_in) with a 2:4 semi-structured weight (C_out, C_in).

    The output is contiguous NCHW, like the convolution's: a channels-last view would be cheaper
    before diffusers' ``Transformer2DModel`` permutes it to tokens, but everywhere else (``proj_out``,
    ``conv_shortcut``) it would meet an NCHW residual and spread a mixed layout through the network.
    """

    def __init__(self, conv: nn.Conv2d, weight: torch.Tensor):
        super().__init__()
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size, self.stride, self.padding = conv.kernel_size, conv.stride, conv.padding
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        y = F.linear(x.permute(0, 2, 3, 1).reshape(n * h * w, c), self.weight, self.bias)
        return y.view(n, h, w, self.out_channels).permute(0, 3, 1, 2).contiguous()

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, semi-structured 2:4"


@contextmanager
def _backend(backend: str):
    from torch.sparse import SparseSemiStructuredTensor

    previous = SparseSemiStructuredTensor._FORCE_CUTLASS
    SparseSemiStructuredTensor._FORCE_CUTLASS = backend == "cutlass"
    try:
        yield
    finally:
        SparseSemiStructuredTensor._FORCE_CUTLASS = previous


def require_cuda(backend: str = "cusparselt") -> None:
    if backend == "dense":
        return
    if not torch.cuda.is_available():
        raise DeployKitError("2:4 semi-structured kernels need a CUDA GPU (torch sees none): masks, checks and "
                             "plan_semi_structured() run anywhere, to_semi_structured() does not")
    if backend == "cusparselt" and not torch.backends.cusparselt.is_available():
        raise DeployKitError("this torch build has no cuSPARSELt (torch.backends.cusparselt.is_available() is False); "
                             "pass backend='cutlass' to use torch's CUTLASS 2:4 kernels")
    major, minor = torch.cuda.get_device_capability()
    if major < 8:
        raise DeployKitError(f"2:4 sparse tensor cores need compute capability 8.0 or newer, this GPU is {major}.{minor}")


@torch.no_grad()
def to_semi_structured(model: nn.Module, dtype: torch.dtype = torch.float16, names: Iterable[str] | None = None,
                       backend: str = "cusparselt", conv1x1: bool = True) -> SemiStructuredPlan:
    """Swap the 2:4 weights of ``model`` for semi-structured tensors in place; returns what converted and what did not.

    The model is moved to CUDA and ``dtype`` first (a semi-structured weight cannot be moved or cast
    afterwards: torch implements only ``.to("cpu")`` for it). Run the model under ``torch.no_grad()``
    (inference only). ``names`` limits the conversion to those layers (e.g. the keys of the masks).
    ``backend="dense"`` makes the same swaps with dense weights, on the model's own device and dtype.
    """
    require_cuda(backend)
    plan = plan_semi_structured(model, dtype, names, backend, conv1x1)
    if backend == "dense":
        for name in plan.convert:
            module = model.get_submodule(name)
            if isinstance(module, nn.Conv2d):
                w = module.weight.detach()
                _set_submodule(model, name, SemiStructuredConv1x1(module, w.reshape(w.shape[0], w.shape[1]).clone()))
        return plan
    from torch.sparse import to_sparse_semi_structured

    tensors = [t for t in list(model.parameters()) + list(model.buffers()) if t.is_floating_point()]
    if any(not t.is_cuda or t.dtype != dtype for t in tensors):
        if any(_is_semi_structured(t) for t in tensors):
            raise DeployKitError(f"move the model to CUDA and {dtype} before its first conversion: semi-structured "
                                 "weights cannot be moved or cast")
        model.to(device="cuda", dtype=dtype)
    with _backend(backend):
        for name in plan.convert:
            module = model.get_submodule(name)
            weight = module.weight.detach()
            if isinstance(module, nn.Conv2d):
                sparse = to_sparse_semi_structured(weight.reshape(weight.shape[0], weight.shape[1]).contiguous())
                _set_submodule(model, name, SemiStructuredConv1x1(module, sparse))
            else:
                module.weight = nn.Parameter(to_sparse_semi_structured(weight.contiguous()), requires_grad=False)
    return plan


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
