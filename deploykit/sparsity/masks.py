"""2:4 semi-structured weight masks: which layers get one, how it is chosen, how it is kept.

Layout. In every group of 4 consecutive *input* channels, 2 weights are kept and 2 are zero: for
``nn.Linear`` (out, in) the groups run along ``in``; for ``nn.Conv2d`` (C_out, C_in, kh, kw) they run
along ``C_in`` separately for each output channel and each kernel position. That is the layout
TensorRT's sparse tactics (C_in % 4 == 0) and cuSPARSELt (the GEMM's K dimension, the rows of a
linear weight) read, so one set of masks serves both backends.

Eligibility (:func:`eligible_layers`): ``nn.Linear`` and ungrouped ``nn.Conv2d``, matched by
``include`` and by none of ``exclude`` (fnmatch globs on module names), with ``C_in % 4 == 0`` and
both widths at least ``min_features``. Defaults:

- ``conv_in`` / ``conv_out``: the model's data in and out, few channels, most sensitive to error;
  ``time_embedding.*`` / ``add_embedding.*`` / ``*.time_emb_proj``: they run once per sample (one
  row per image, a GEMV at batch 2) where a 2:4 kernel cannot win, and every block reads them.
- ``min_features = 256``: 2:4 halves the multiplies, not the bytes moved, so it pays only where a
  layer is compute-bound. A GEMM of width c over many tokens does about c/2 FLOPs per byte in fp16;
  an H100's fp16 tensor cores need about 300 FLOP/B to be busy (A100: about 150, Orin less), so a
  width of 320 (SD's first level) is already borderline on an H100 and anything under 256 is
  memory- or launch-bound everywhere. TensorRT times sparse tactics and keeps them only where they
  win; the GPU benchmark records which layers went sparse.

The algorithm never owns data: :func:`sparsify` takes the model, a :class:`SparsityConfig` and, for
data-driven methods, a ``forward_loop(model)`` that runs the caller's calibration data.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatch
from pathlib import Path

import torch
from torch import nn

from deploykit.errors import DeployKitError, InputError

METHODS = ("magnitude", "sparsegpt")
DEFAULT_EXCLUDE = ("conv_in", "conv_out", "time_embedding.*", "add_embedding.*", "*time_emb_proj")
DEFAULT_MIN_FEATURES = 256
MASK_FORMAT = "deploykit-2:4-v1"
MASKS_FILE = "sparsity_masks.safetensors"  # beside model/model.safetensors


@dataclass
class SparsityConfig:
    method: str = "magnitude"
    include: Sequence[str] = ("*",)                 # fnmatch globs of module names that may get a mask
    exclude: Sequence[str] = DEFAULT_EXCLUDE        # ... and those that never do (wins over include)
    min_features: int = DEFAULT_MIN_FEATURES        # both C_in and C_out must be at least this

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise InputError(f"sparsity method {self.method!r} is unknown (known: {', '.join(METHODS)})")
        if isinstance(self.include, str) or isinstance(self.exclude, str):
            raise InputError("sparsity include / exclude must be lists of glob patterns, not one string")
        if self.min_features < 0:
            raise InputError(f"min_features must be >= 0, got {self.min_features}")


@dataclass
class Violation:
    """A layer whose weight breaks 2:4 (or could not be checked)."""

    name: str
    detail: str
    bad_groups: int = 0
    groups: int = 0

    def __str__(self) -> str:
        counts = f" ({self.bad_groups} of {self.groups} groups of 4 keep more than 2)" if self.groups else ""
        return f"{self.name}: {self.detail}{counts}"


@dataclass
class Eligibility:
    layers: dict[str, nn.Module] = field(default_factory=dict)  # name -> module that gets a mask
    skipped: dict[str, str] = field(default_factory=dict)       # name -> why not


def _in_out(module: nn.Module) -> tuple[int, int]:
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    return module.in_channels, module.out_channels


def eligible_layers(model: nn.Module, config: SparsityConfig | None = None) -> Eligibility:
    """Every Linear / Conv2d of ``model``, split into those that get a 2:4 mask and those that do not (with why)."""
    config = config or SparsityConfig()
    out = Eligibility()
    for name, m in model.named_modules():
        if not isinstance(m, (nn.Linear, nn.Conv2d)):
            continue
        c_in, c_out = _in_out(m)
        excluded = next((p for p in config.exclude if fnmatch(name, p)), None)
        if excluded is not None:
            out.skipped[name] = f"excluded by {excluded!r}"
        elif not any(fnmatch(name, p) for p in config.include):
            out.skipped[name] = "not matched by include"
        elif isinstance(m, nn.Conv2d) and m.groups != 1:
            out.skipped[name] = f"grouped conv (groups={m.groups})"
        elif m.weight.dim() not in (2, 4):
            out.skipped[name] = f"weight of rank {m.weight.dim()}"
        elif c_in % 4:
            out.skipped[name] = f"C_in {c_in} not a multiple of 4"
        elif min(c_in, c_out) < config.min_features:
            out.skipped[name] = f"too small: min(C_in, C_out) = {min(c_in, c_out)} < min_features {config.min_features}"
        else:
            out.layers[name] = m
    return out


# -- the layout: input channels last, in groups of 4 ------------------------------------------------

def _groups(t: torch.Tensor) -> torch.Tensor:
    """(out, in) or (out, in, kh, kw) -> (..., in // 4, 4) with the input channels in the last two dims."""
    if t.dim() == 4:
        t = t.permute(0, 2, 3, 1)  # (out, kh, kw, in)
    elif t.dim() != 2:
        raise ValueError(f"2:4 masks are for 2-d (Linear) or 4-d (Conv2d) weights, got shape {tuple(t.shape)}")
    if t.shape[-1] % 4:
        raise ValueError(f"input dimension {t.shape[-1]} of weight {tuple(t.shape)} is not a multiple of 4")
    return t.reshape(*t.shape[:-1], t.shape[-1] // 4, 4)


def _ungroup(g: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    if len(shape) == 4:
        out, c_in, kh, kw = shape
        return g.reshape(out, kh, kw, c_in).permute(0, 3, 1, 2).contiguous()
    return g.reshape(shape).contiguous()


@torch.no_grad()
def magnitude_mask(weight: torch.Tensor) -> torch.Tensor:
    """The 2:4 mask (bool, shape of ``weight``) keeping the 2 largest |w| of every 4 input channels."""
    g = _groups(weight.detach().abs().float())
    keep = g.topk(2, dim=-1).indices
    mask = torch.zeros_like(g, dtype=torch.bool).scatter_(-1, keep, True)
    return _ungroup(mask, weight.shape)


@torch.no_grad()
def _bad_groups(weight: torch.Tensor) -> tuple[int, int]:
    g = _groups(weight.detach())
    nonzero = (g != 0).sum(dim=-1)
    return int((nonzero > 2).sum()), nonzero.numel()


def is_2to4(weight: torch.Tensor) -> bool:
    """True if every group of 4 input channels of ``weight`` holds at most 2 non-zeros."""
    if weight.dim() not in (2, 4) or weight.shape[1] % 4:
        return False
    return _bad_groups(weight)[0] == 0


# -- applying, checking, storing ---------------------------------------------------------------------

def _weight_of(model: nn.Module, name: str) -> nn.Parameter:
    try:
        module = model.get_submodule(name)
    except AttributeError as e:
        raise InputError(f"mask for {name!r}: the model has no such layer") from e
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor):
        raise InputError(f"mask for {name!r}: the layer has no weight")
    return weight


@torch.no_grad()
def apply_masks(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> nn.Module:
    """Zero the masked-out weights in place (call after every optimizer step while training); returns ``model``."""
    for name, mask in masks.items():
        weight = _weight_of(model, name)
        if mask.shape != weight.shape:
            raise InputError(f"mask for {name!r} has shape {tuple(mask.shape)}, the weight {tuple(weight.shape)}")
        weight.masked_fill_(~mask.to(device=weight.device, dtype=torch.bool), 0)
    return model


def check_2to4(model_or_state: nn.Module | Mapping[str, torch.Tensor], names: Iterable[str]) -> list[Violation]:
    """The layers among ``names`` whose weights are not 2:4 along the input dimension (empty: all fine).

    ``model_or_state`` is a model (``names`` are module names) or a state dict (``names`` are module
    names, looked up as ``NAME.weight``, or parameter names).
    """
    violations = []
    for name in names:
        if isinstance(model_or_state, nn.Module):
            try:
                weight = _weight_of(model_or_state, name)
            except InputError as e:
                violations.append(Violation(name, str(e)))
                continue
        else:
            weight = model_or_state.get(f"{name}.weight", model_or_state.get(name))
            if weight is None:
                violations.append(Violation(name, "not in the state dict"))
                continue
        if weight.dim() not in (2, 4):
            violations.append(Violation(name, f"weight of shape {tuple(weight.shape)} cannot be 2:4"))
        elif weight.shape[1] % 4:
            violations.append(Violation(name, f"input dimension {weight.shape[1]} is not a multiple of 4"))
        else:
            bad, groups = _bad_groups(weight)
            if bad:
                violations.append(Violation(name, "not 2:4", bad, groups))
    return violations


def masks_summary(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> dict:
    """How much of the model the masks cover: layers, weights under a mask, weights zeroed."""
    total = sum(p.numel() for p in model.parameters())
    covered = sum(m.numel() for m in masks.values())
    return {"layers": len(masks), "masked_weights": covered, "zeroed_weights": sum(int((~m).sum()) for m in masks.values()),
            "share_of_params": covered / total if total else 0.0}


def save_masks(path: str | Path, masks: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> Path:
    """Write masks as safetensors, bit-packed (1 bit per weight), atomically; a folder gets ``sparsity_masks.safetensors``."""
    from deploykit.io import save_tensors

    path = Path(path)
    if path.is_dir() or not path.suffix:
        path = path / MASKS_FILE
    packed, shapes = {}, {}
    for name, mask in masks.items():
        if mask.dtype != torch.bool:
            raise InputError(f"mask for {name!r} has dtype {mask.dtype}, expected torch.bool")
        packed[name] = _pack_bits(mask)
        shapes[name] = list(mask.shape)
    meta = {"format": MASK_FORMAT, "layout": "2:4 along input channels", "shapes": json.dumps(shapes), **(metadata or {})}
    save_tensors(path, packed, metadata=meta)
    return path


def load_masks(path: str | Path, check: bool = True) -> dict[str, torch.Tensor]:
    """Read masks written by :func:`save_masks`; ``check`` verifies each is 2:4 (InputError if not)."""
    from safetensors import safe_open

    path = Path(path)
    if path.is_dir():
        path = path / MASKS_FILE
    if not path.is_file():
        raise InputError(f"no masks at {path}")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != MASK_FORMAT:
            raise InputError(f"{path} is not a deploykit mask file (format {meta.get('format')!r})")
        shapes = json.loads(meta["shapes"])
        masks = {name: _unpack_bits(f.get_tensor(name), shapes[name]) for name in f.keys()}
    if check:
        bad = check_2to4(masks, masks)
        if bad:
            raise InputError(f"{path}: masks are not 2:4: " + "; ".join(map(str, bad[:5])))
    return masks


_BITS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)


def _pack_bits(mask: torch.Tensor) -> torch.Tensor:
    flat = mask.detach().reshape(-1).cpu()
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return (flat.view(-1, 8).to(torch.uint8) * _BITS).sum(dim=1, dtype=torch.uint8)


def _unpack_bits(packed: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    bits = (packed.view(-1, 1) & _BITS) != 0
    n = 1
    for s in shape:
        n *= s
    return bits.reshape(-1)[:n].reshape(tuple(shape)).contiguous()


# -- the algorithm --------------------------------------------------------------------------------------

def sparsify(model: nn.Module, config: SparsityConfig | None = None,
             forward_loop: Callable[[nn.Module], None] | None = None) -> dict[str, torch.Tensor]:
    """Choose 2:4 masks for the eligible layers of ``model``, zero the pruned weights in place, return the masks.

    ``magnitude`` keeps the 2 largest |w| of every 4 input channels. ``sparsegpt`` (through
    nvidia-modelopt) also updates the kept weights to compensate, from the activations that
    ``forward_loop(model)`` produces; it raises :class:`InputError` where modelopt is not installed.
    Masks are bool tensors shaped like the weights, on the weights' device, keyed by module name.
    """
    config = config or SparsityConfig()
    layers = eligible_layers(model, config).layers
    if config.method == "magnitude":
        masks = {name: magnitude_mask(m.weight) for name, m in layers.items()}
    else:
        masks = _sparsegpt_masks(model, layers, forward_loop)
    apply_masks(model, masks)
    return masks


def _sparsegpt_masks(model: nn.Module, layers: Mapping[str, nn.Module],
                     forward_loop: Callable[[nn.Module], None] | None) -> dict[str, torch.Tensor]:
    """SparseGPT through modelopt on a copy, whose weights and masks are then copied back by layer name."""
    if forward_loop is None:
        raise InputError("sparsity method 'sparsegpt' needs calibration data: pass a forward_loop(model)")
    try:
        import modelopt.torch.sparsity as mts
    except ImportError as e:
        raise InputError("sparsity method 'sparsegpt' needs nvidia-modelopt (pip install nvidia-modelopt); "
                         "method 'magnitude' needs nothing") from e
    import inspect

    work = copy.deepcopy(model)
    # modelopt rules: module-name globs -> config; None freezes a layer (keeps it dense)
    rules = {"*": None, **{name: {} for name in layers}}
    mode = [("sparsegpt", {"nn.Linear": rules, "nn.Conv2d": rules})]
    if "forward_loop" in inspect.signature(mts.sparsify).parameters:  # newer modelopt
        work = mts.sparsify(work, mode, forward_loop=forward_loop)
    else:
        work = mts.sparsify(work, mode, config={"forward_loop": forward_loop})
    masks = {}
    with torch.no_grad():
        for name in layers:
            sub = work.get_submodule(name)
            mask = getattr(sub, "_weight_mask", None)
            weight = sub.weight.detach()
            mask = (weight != 0) if mask is None else mask.to(torch.bool)
            masks[name] = mask
            model.get_submodule(name).weight.copy_(weight * mask)
    bad = check_2to4(model, masks)
    if bad:
        raise DeployKitError("modelopt's sparsegpt masks are not 2:4 along the input channels: " + "; ".join(map(str, bad[:5])))
    return masks
