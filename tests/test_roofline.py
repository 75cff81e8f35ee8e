"""The roofline latency model: FLOPs and bytes per op, the estimate, and its place in the report."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from deploykit.bench.roofline import DEVICES, Device, OpCost, device_for_gpu, estimate, measure_cpu, op_costs, totals


def test_linear_flops_and_bytes_match_the_formulas():
    layer = nn.Linear(64, 32)
    x = torch.randn(8, 64)
    costs = [c for c in op_costs(layer, (x,)) if c.kind != "other"]
    assert len(costs) == 1
    c = costs[0]
    assert c.kind == "matmul" and c.flops == 2 * 8 * 64 * 32
    assert c.bytes == 4 * (8 * 64 + 64 * 32 + 32 + 8 * 32)  # input, weight, bias read; output written
    assert c.weight_bytes == 4 * (64 * 32 + 32) and c.module == ""


def test_conv_and_attention_flops():
    conv = nn.Conv2d(3, 16, 3, padding=1)
    (c,) = [c for c in op_costs(conv, (torch.randn(2, 3, 8, 8),)) if c.kind == "conv"]
    assert c.flops == 2 * (2 * 16 * 8 * 8) * (3 * 3 * 3)
    assert c.bytes == 4 * (2 * 3 * 8 * 8 + 16 * 3 * 3 * 3 + 16 + 2 * 16 * 8 * 8)

    class Attn(nn.Module):
        def forward(self, q, k, v):
            return nn.functional.scaled_dot_product_attention(q, k, v)

    q, k, v = torch.randn(2, 4, 10, 8), torch.randn(2, 4, 6, 8), torch.randn(2, 4, 6, 16)
    (a,) = op_costs(Attn(), (q, k, v))
    assert a.kind == "attention" and a.flops == 2 * 2 * 4 * 10 * 6 * (8 + 16)
    assert a.bytes == 4 * (q.numel() + k.numel() + v.numel() + 2 * 4 * 10 * 16)  # fused: scores never stored


def test_counting_on_the_meta_device_matches_a_real_pass(tiny_unet):
    from deploykit.models.inputs import example_unet_inputs

    inputs = example_unet_inputs(tiny_unet, 2)
    real = totals(op_costs(tiny_unet, inputs))
    meta = totals(op_costs(tiny_unet.to("meta"), tuple(x.to("meta") for x in inputs)))
    assert real["flops"] == meta["flops"] > 0
    # a real CPU pass adds the odd layout copy the meta device skips (group_norm of a transposed input)
    assert meta["bytes"] == pytest.approx(real["bytes"], rel=0.01)


def test_estimate_is_the_roofline_of_each_op():
    device = Device("toy", bandwidth=1e9, matrix={"fp16": 1e12}, vector=1e10, sparse={"fp16": 2e12}, launch_s=1e-6)
    compute_bound = OpCost("mm", "a", "matmul", flops=1e9, bytes=1e5, weight_bytes=5e4)     # 1 ms vs 0.1 ms
    memory_bound = OpCost("add", "b", "other", flops=1e5, bytes=1e6)                       # 0.01 ms vs 1 ms
    e = estimate([compute_bound, memory_bound], device, "fp16")
    assert e["roofline_ms"] == pytest.approx(2.0) and e["compute_bound_ops"] == 1
    assert e["ms"] == pytest.approx(2.0 + 2e-3)
    sparse = estimate([compute_bound, memory_bound], device, "fp16", sparse_layers={"a"})
    assert sparse["roofline_ms"] == pytest.approx(1.5)  # the sparse peak doubles; weights read at half size
    with pytest.raises(ValueError, match="no int8 peak"):
        estimate([compute_bound], device, "int8")


def test_estimate_grows_with_macs(tiny_unet):
    from deploykit.models.inputs import example_unet_inputs
    from deploykit.prune import PruneConfig, prune_to_macs

    inputs = example_unet_inputs(tiny_unet, 4)
    student, _ = prune_to_macs(tiny_unet, inputs, PruneConfig(macs_target=0.4, round_to=4))
    for device in DEVICES.values():
        dense = estimate(op_costs(tiny_unet, inputs), device, "fp16")
        pruned = estimate(op_costs(student, inputs), device, "fp16")
        assert pruned["roofline_ms"] < dense["roofline_ms"]


def test_device_table():
    assert DEVICES["jetson-agx-orin-64gb"].bandwidth == 204.8e9
    assert DEVICES["jetson-orin-nano-8gb"].bandwidth == 68e9
    assert DEVICES["h100-sxm"].matrix["fp16"] == 989.4e12
    assert device_for_gpu("NVIDIA H100 80GB HBM3") is DEVICES["h100-sxm"]
    assert device_for_gpu("NVIDIA GeForce RTX 4090") is None
    cpu = measure_cpu(seconds=0.05, matrix_side=256, copy_mb=8)
    assert cpu.matrix["fp32"] > 1e8 and cpu.bandwidth > 1e8


# bench.estimate end to end (report.json / report.md): tests/test_verify.py, in the same build as verify
