"""A roofline latency model: per-op FLOPs and bytes from one forward pass, and a device's peaks.

``op_costs(model, inputs)`` runs one forward pass under a dispatch mode and records, for every aten op
that computes or moves data (views and metadata ops are skipped), its FLOPs (torch's own formulas for
matmuls and convolutions; fused attention counted here as 2·L·S·(d + d_v) per head) and its bytes:
every tensor it reads plus every tensor it writes. Weights count as read by the op that uses them.

``estimate(costs, device, precision)`` then sums, per op, ``max(flops / peak, bytes / bandwidth)``
(the op is either compute- or memory-bound) and adds ``launch_s`` per op (kernel launch or dispatch
floor). Matmuls, convolutions and attention use the device's matrix peak at the precision (tensor
cores on GPUs; the 2:4 sparse peak for layers named in ``sparse_layers``, with their weights read at
half size); other ops (norms, activations, adds) run at the vector peak.

What the model leaves out, on purpose: kernel fusion (an engine that fuses an activation into the
preceding convolution does not read it back; counting it makes the estimate an upper bound on bytes),
caches (weights and activations that stay in L2 / LLC are counted as DRAM traffic), and efficiency
below peak (a convolution rarely reaches the sgemm peak). Its error is measured where we can measure:
``benchmarks/roofline.py`` commits estimate beside measurement for this CPU and for the H100 figures.

Costs can be counted on the meta device (shapes only, no arithmetic): an SD1.5 UNet at 512x512 in
fp16 takes about a second to count. The counts are of the ops the counting device dispatches: a real
CPU pass adds the odd layout copy (a group norm of a transposed input) that the meta device skips
(0.2% of the bytes of a tiny UNet).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from deploykit.models.ops import attention_macs

# ops that only reinterpret metadata: no kernel, no traffic
_FREE_OPS = {
    "view", "_unsafe_view", "reshape", "permute", "transpose", "t", "expand", "squeeze", "unsqueeze", "select", "slice",
    "detach", "alias", "as_strided", "unbind", "split", "split_with_sizes", "chunk", "lift_fresh", "_to_copy_noop",
    "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "sym_size", "sym_stride", "sym_numel", "dim",
    "is_same_size", "_reshape_alias", "view_as", "expand_as", "unflatten", "flatten", "numpy_T", "_local_scalar_dense",
}
MATRIX_KINDS = ("matmul", "conv", "attention")


@dataclass
class OpCost:
    op: str
    module: str
    kind: str  # matmul | conv | attention | other
    flops: float
    bytes: float
    weight_bytes: float = 0.0


def _numel_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _attention_flops(args: Sequence) -> float:
    return 2.0 * attention_macs(args[0].shape, args[1].shape, args[2].shape)


class _CostMode(TorchDispatchMode):
    def __init__(self, weights: set[int], module_stack: list[str]):
        super().__init__()
        self.weights = weights
        self.module_stack = module_stack
        self.costs: list[OpCost] = []
        self.suspended = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch.utils.flop_counter import flop_registry

        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        if name in _FREE_OPS or self.suspended:
            return out
        ins = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        flops = 0.0
        if "scaled_dot_product" in name or name in ("_flash_attention_forward", "_efficient_attention_forward"):
            kind, flops = "attention", _attention_flops(args)
            outs = outs[:1]  # logsumexp and RNG state are bookkeeping
        elif func.overloadpacket in flop_registry:
            flops = float(flop_registry[func.overloadpacket](*args, **kwargs, out_val=out))
            kind = "conv" if "conv" in name else "matmul"
        else:
            kind = "other"
        if name in ("copy_", "fill_", "zero_") and ins:
            ins = ins[1:] if name == "copy_" else []
        weight_bytes = sum(_numel_bytes(t) for t in ins if id(t) in self.weights or _base_id(t) in self.weights)
        self.costs.append(OpCost(name, self.module_stack[-1] if self.module_stack else "", kind, flops,
                                 float(sum(_numel_bytes(t) for t in ins) + sum(_numel_bytes(t) for t in outs)),
                                 float(weight_bytes)))
        return out


class _FusedAttention(TorchFunctionMode):
    """Counts ``F.scaled_dot_product_attention`` as one fused kernel (what flash / memory-efficient
    kernels and TensorRT's MHA fusion run: q, k, v read once, the output written once, the L x S scores
    never stored), whatever decomposition the current device dispatches to (the meta device and the
    math fallback materialise the scores)."""

    def __init__(self, cost_mode: _CostMode):
        super().__init__()
        self.cost_mode = cost_mode

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not torch.nn.functional.scaled_dot_product_attention:
            return func(*args, **kwargs)
        mode = self.cost_mode
        mode.suspended = True
        try:
            out = func(*args, **kwargs)
        finally:
            mode.suspended = False
        q, k, v = args[0], args[1], args[2]
        moved = sum(_numel_bytes(t) for t in (q, k, v, out))
        mode.costs.append(OpCost("scaled_dot_product_attention", mode.module_stack[-1] if mode.module_stack else "",
                                 "attention", _attention_flops(args), float(moved)))
        return out


def _base_id(t: torch.Tensor) -> int:
    base = t._base if t._base is not None else t
    return id(base)


def op_costs(model: nn.Module, inputs: Sequence[torch.Tensor]) -> list[OpCost]:
    """Every data-moving op of one ``model(*inputs)`` call, with the innermost module that ran it.

    ``model`` and ``inputs`` may live on the meta device: shapes are all the model needs.
    """
    names = {id(m): n for n, m in model.named_modules()}
    stack: list[str] = []
    weights = {id(p) for p in model.parameters()} | {id(b) for b in model.buffers()}

    def push(module, _args):
        stack.append(names.get(id(module), stack[-1] if stack else ""))

    def pop(module, _args, _out):
        if stack:
            stack.pop()

    handles = [m.register_forward_pre_hook(push) for m in model.modules()]
    handles += [m.register_forward_hook(pop) for m in model.modules()]
    mode = _CostMode(weights, stack)
    try:
        from deploykit.models.inputs import unet_of
        from deploykit.models.wrappers import tensor_view

        call = tensor_view(model) if hasattr(unet_of(model), "config") else model  # diffusers models return dataclasses
        with torch.no_grad(), mode, _FusedAttention(mode):
            call(*inputs)
    finally:
        for h in handles:
            h.remove()
    return mode.costs


def totals(costs: Iterable[OpCost]) -> dict:
    costs = list(costs)
    return {"ops": len(costs), "flops": sum(c.flops for c in costs), "bytes": sum(c.bytes for c in costs),
            "weight_bytes": sum(c.weight_bytes for c in costs),
            "matrix_flops": sum(c.flops for c in costs if c.kind in MATRIX_KINDS)}


# ----------------------------------------------------------------------------------------------
# devices


@dataclass(frozen=True)
class Device:
    """Published (or measured) peaks of one device. ``matrix`` / ``sparse``: FLOP/s (OP/s for int8) of
    dense / 2:4-sparse matrix math per precision; ``vector``: FLOP/s of everything else; ``bandwidth``:
    DRAM bytes/s; ``launch_s``: time added per op."""

    name: str
    bandwidth: float
    matrix: dict[str, float]
    vector: float
    sparse: dict[str, float] = field(default_factory=dict)
    launch_s: float = 0.0
    source: str = ""


# Peaks as the vendors publish them (GPU only: Jetson DLAs are not counted). Dense = sparse / 2 where
# only the sparse figure is printed.
DEVICES: dict[str, Device] = {
    # NVIDIA Jetson AGX Orin Series Technical Brief (v1.2) and Jetson AGX Orin data sheet, 64 GB module:
    # 204.8 GB/s LPDDR5; Ampere GPU, 2048 CUDA cores / 64 tensor cores at 1.3 GHz: 170 sparse INT8 TOPS
    # (85 dense), 85 sparse FP16 tensor TFLOPS (42.5 dense), 5.3 FP32 TFLOPS on CUDA cores.
    "jetson-agx-orin-64gb": Device(
        "Jetson AGX Orin 64GB", 204.8e9, {"fp16": 42.5e12, "int8": 85e12, "fp32": 5.3e12}, 5.3e12,
        {"fp16": 85e12, "int8": 170e12}, launch_s=5e-6,
        source="NVIDIA Jetson AGX Orin Series Technical Brief v1.2 / data sheet (GPU only, no DLA)"),
    # Jetson Orin Nano Series data sheet, 8 GB module (original, 15 W): 68 GB/s LPDDR5; 1024 CUDA cores /
    # 32 tensor cores at 625 MHz: 40 sparse INT8 TOPS (20 dense), 20 sparse FP16 TFLOPS (10 dense),
    # 1.28 FP32 TFLOPS. (JetPack 6.2 "Super" mode raises clocks: 67 sparse TOPS, 102 GB/s.)
    "jetson-orin-nano-8gb": Device(
        "Jetson Orin Nano 8GB", 68e9, {"fp16": 10e12, "int8": 20e12, "fp32": 1.28e12}, 1.28e12,
        {"fp16": 20e12, "int8": 40e12}, launch_s=5e-6,
        source="NVIDIA Jetson Orin Nano Series data sheet (8 GB, 15 W, GPU only)"),
    # NVIDIA H100 Tensor Core GPU data sheet, SXM5 column: 3.35 TB/s HBM3; FP16 tensor 989.4 TFLOPS dense
    # (1979 sparse), INT8 1979 TOPS dense (3958 sparse), TF32 494.7, FP32 66.9 TFLOPS.
    "h100-sxm": Device(
        "H100 SXM5 80GB", 3.35e12, {"fp16": 989.4e12, "int8": 1978.9e12, "fp32": 494.7e12}, 66.9e12,
        {"fp16": 1978.9e12, "int8": 3957.8e12}, launch_s=2e-6,
        source="NVIDIA H100 Tensor Core GPU data sheet (SXM5)"),
}
# GPU names as torch reports them -> table entries
GPU_NAMES = {"H100 80GB HBM3": "h100-sxm", "H100 SXM": "h100-sxm", "Orin": "jetson-agx-orin-64gb"}
# recipe targets (deploykit.recipe.JETSON_TARGETS) -> table entries: a Jetson recipe is estimated for its device
TARGET_DEVICES = {"jetson-agx-orin": "jetson-agx-orin-64gb", "jetson-orin-nano": "jetson-orin-nano-8gb"}


def device_for_gpu(gpu_name: str) -> Device | None:
    for key, entry in GPU_NAMES.items():
        if key.lower() in gpu_name.lower():
            return DEVICES[entry]
    return None


def measure_cpu(seconds: float = 1.0, matrix_side: int = 2048, copy_mb: int = 256) -> Device:
    """This CPU's peaks, measured: fp32 sgemm FLOP/s (``matrix_side``² matmul on all torch threads) and
    memcpy bandwidth (bytes read + written by copying a ``copy_mb`` MB tensor, well past the caches).
    Best of repeated runs over about ``seconds`` each."""
    from deploykit.bench.machine import cpu_name

    a = torch.randn(matrix_side, matrix_side)
    b = torch.randn(matrix_side, matrix_side)
    c = torch.empty(matrix_side, matrix_side)
    best = _best_time(lambda: torch.mm(a, b, out=c), seconds)
    flops = 2.0 * matrix_side ** 3 / best
    src = torch.empty(copy_mb * 2 ** 20 // 4)
    dst = torch.empty_like(src)
    best = _best_time(lambda: dst.copy_(src), seconds)
    bandwidth = 2.0 * src.numel() * 4 / best
    return Device(f"{cpu_name()} ({torch.get_num_threads()} threads)", bandwidth, {"fp32": flops}, flops,
                  source=f"measured: {matrix_side}x{matrix_side} fp32 sgemm and a {copy_mb} MB memcpy (read + write)")


def _best_time(fn, seconds: float) -> float:
    fn()
    best, spent = float("inf"), 0.0
    while spent < seconds or best == float("inf"):
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        best, spent = min(best, dt), spent + dt
    return best


# ----------------------------------------------------------------------------------------------
# the estimate


def estimate(costs: Sequence[OpCost], device: Device, precision: str = "fp32", sparse_layers: Iterable[str] = (),
             launch_s: float | None = None, bytes_scale: float = 1.0) -> dict:
    """Roofline time of one call: per op max(compute, memory) plus ``launch_s`` (default the device's).

    ``precision`` picks the matrix peak; ``bytes_scale`` rescales the counted bytes (costs counted in
    fp32 used for an fp16 estimate: 0.5). Returns ms totals and how many ops were compute-bound.
    """
    if precision not in device.matrix:
        raise ValueError(f"{device.name} has no {precision} peak (has {sorted(device.matrix)})")
    sparse = set(sparse_layers)
    launch = device.launch_s if launch_s is None else launch_s
    compute_s = memory_s = roofline_s = 0.0
    compute_bound = 0
    for c in costs:
        is_sparse = c.kind in MATRIX_KINDS and c.module in sparse and precision in device.sparse
        peak = (device.sparse[precision] if is_sparse else device.matrix[precision]) if c.kind in MATRIX_KINDS else device.vector
        moved = (c.bytes - (c.weight_bytes / 2 if is_sparse else 0.0)) * bytes_scale
        t_compute, t_memory = c.flops / peak, moved / device.bandwidth
        compute_s += t_compute
        memory_s += t_memory
        roofline_s += max(t_compute, t_memory)
        compute_bound += t_compute > t_memory
    return {"device": device.name, "precision": precision, "ops": len(costs), "compute_bound_ops": compute_bound,
            "roofline_ms": roofline_s * 1e3, "launch_ms": len(costs) * launch * 1e3,
            "ms": (roofline_s + len(costs) * launch) * 1e3, "compute_ms": compute_s * 1e3, "memory_ms": memory_s * 1e3,
            "launch_us_per_op": launch * 1e6}


def device_record(device: Device) -> dict:
    return asdict(device)


def top_layers(costs: Sequence[OpCost], device: Device, precision: str = "fp32", n: int = 10) -> list[dict]:
    """The ``n`` modules that take longest in the estimate (roofline time, launches left out)."""
    by_module: dict[str, dict] = {}
    for c in costs:
        peak = device.matrix[precision] if c.kind in MATRIX_KINDS else device.vector
        entry = by_module.setdefault(c.module, {"module": c.module, "flops": 0.0, "bytes": 0.0, "ms": 0.0, "ops": 0})
        entry["flops"] += c.flops
        entry["bytes"] += c.bytes
        entry["ms"] += max(c.flops / peak, c.bytes / device.bandwidth) * 1e3
        entry["ops"] += 1
    return sorted(by_module.values(), key=lambda e: -e["ms"])[:n]
