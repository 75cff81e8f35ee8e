"""2:4 masks: layout, choice, exclusions, persistence through training and files; the 1x1-conv rewrite."""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch
from torch import nn

from deploykit.errors import DeployKitError, InputError
from deploykit.models.inputs import example_unet_inputs
from deploykit.models.topologies import build_unet
from deploykit.models.wrappers import tensor_view
from deploykit.sparsity import (
    SemiStructuredConv1x1,
    SparsityConfig,
    apply_masks,
    check_2to4,
    eligible_layers,
    is_2to4,
    load_masks,
    magnitude_mask,
    plan_semi_structured,
    save_masks,
    sparsify,
    to_semi_structured,
)

SMALL = SparsityConfig(min_features=0)


def _kept_per_group_along_input(mask: torch.Tensor) -> torch.Tensor:
    """Kept count of each group of 4 consecutive input channels (per output channel and kernel position)."""
    if mask.dim() == 4:
        mask = mask.permute(0, 2, 3, 1)
    return mask.reshape(*mask.shape[:-1], mask.shape[-1] // 4, 4).sum(-1)


def test_linear_mask_is_2to4_along_the_input_dimension():
    torch.manual_seed(0)
    w = torch.randn(8, 16)
    mask = magnitude_mask(w)
    assert mask.dtype == torch.bool and mask.shape == w.shape
    assert (_kept_per_group_along_input(mask) == 2).all()
    # along the output dimension the same mask is not 2:4: the groups run along `in`, not `out`
    assert not (mask.t().reshape(16, 2, 4).sum(-1) == 2).all()
    assert is_2to4(w * mask) and not is_2to4(w)


@pytest.mark.parametrize("kernel", [3, 1])
def test_conv_mask_is_2to4_along_input_channels_per_kernel_position(kernel):
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 8, kernel)
    mask = magnitude_mask(conv.weight)
    assert mask.shape == conv.weight.shape
    assert (_kept_per_group_along_input(mask) == 2).all()
    if kernel == 3:
        # grouping the flattened (C_in, kh, kw) rows instead would be a different, wrong layout
        assert not (mask.reshape(8, -1, 4).sum(-1) == 2).all()
    masked = conv.weight.detach() * mask
    assert is_2to4(masked)


def test_magnitude_keeps_the_two_largest_of_each_four():
    w = torch.tensor([[1.0, -5.0, 3.0, 0.5, 0.1, 0.2, -0.3, 0.4]])
    assert magnitude_mask(w).tolist() == [[False, True, True, False, False, False, True, True]]
    torch.manual_seed(1)
    w = torch.randn(4, 3, 3, 3).repeat(1, 4, 1, 1) + torch.randn(4, 12, 3, 3)  # (C_out, C_in=12, 3, 3)
    mask = magnitude_mask(w)
    groups = w.permute(0, 2, 3, 1).reshape(-1, 4).abs()
    kept = mask.permute(0, 2, 3, 1).reshape(-1, 4)
    expected = torch.zeros_like(kept)
    expected.scatter_(1, groups.argsort(dim=1, descending=True)[:, :2], True)
    assert torch.equal(kept, expected)


def test_default_exclusions_keep_tiny_sd_embeddings_and_io_dense():
    unet = build_unet("tiny-sd")
    before = copy.deepcopy(unet.state_dict())
    masks = sparsify(unet, SMALL)  # no size floor: only the default exclusions keep layers dense
    dense = ["conv_in", "conv_out", "time_embedding.linear_1", "time_embedding.linear_2", "down_blocks.0.resnets.0.time_emb_proj"]
    for name in dense:
        assert name not in masks
        assert torch.equal(unet.get_submodule(name).weight, before[f"{name}.weight"])
    for name in ["down_blocks.0.attentions.0.proj_in", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
                 "down_blocks.0.resnets.0.conv1", "down_blocks.1.resnets.0.conv_shortcut"]:
        assert name in masks
        assert not torch.equal(unet.get_submodule(name).weight, before[f"{name}.weight"])
    assert check_2to4(unet, masks) == []
    # the exclusion list, not the layers' sizes, is what kept them dense
    everything = eligible_layers(build_unet("tiny-sd"), SparsityConfig(min_features=0, exclude=())).layers
    assert {"conv_in", "time_embedding.linear_1", "down_blocks.0.resnets.0.time_emb_proj"} <= set(everything)
    # with the default size floor (256) nothing in tiny-sd (32 / 64 channels) qualifies
    default = eligible_layers(build_unet("tiny-sd"))
    assert not default.layers and any("too small" in why for why in default.skipped.values())


def test_apply_masks_rezeroes_after_an_optimizer_step():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    masks = sparsify(model, SMALL)
    assert set(masks) == {"0", "2"}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(torch.randn(4, 16)).pow(2).sum().backward()
    opt.step()
    assert not is_2to4(model[0].weight)  # the step moved pruned weights off zero
    stepped = model[0].weight.detach().clone()
    apply_masks(model, masks)
    assert check_2to4(model, masks) == []
    assert torch.equal(model[0].weight[masks["0"]], stepped[masks["0"]])  # kept weights keep their update
    assert (model[0].weight[~masks["0"]] == 0).all()


def test_check_2to4_reports_a_planted_violation():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8), nn.Conv2d(8, 8, 3))
    masks = sparsify(model, SMALL)
    assert check_2to4(model, masks) == []
    with torch.no_grad():
        model[1].weight[3, 4:8, 1, 2] = 1.0  # one full group of 4 input channels, at one kernel position
    violations = check_2to4(model, masks)
    assert [(v.name, v.bad_groups) for v in violations] == [("1", 1)]
    state = model.state_dict()
    assert [v.name for v in check_2to4(state, ["0", "1"])] == ["1"]
    assert "not in the state dict" in str(check_2to4(state, ["nope"])[0])
    odd = nn.Linear(6, 4)
    assert "multiple of 4" in str(check_2to4(odd.state_dict(), ["weight"])[0])


def test_masks_round_trip_through_safetensors(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Conv2d(8, 5, 3), nn.Linear(64, 16))  # 12 and 360 elements: not multiples of 8
    masks = sparsify(model, SMALL)
    path = save_masks(tmp_path, masks, metadata={"model": "test"})
    assert path.name == "sparsity_masks.safetensors"
    assert path.stat().st_size < sum(m.numel() for m in masks.values())  # bit-packed, not a byte per weight
    loaded = load_masks(tmp_path)
    assert set(loaded) == set(masks)
    for name, mask in masks.items():
        assert loaded[name].dtype == torch.bool and torch.equal(loaded[name], mask)
    broken = {**masks, "2": torch.ones(16, 64, dtype=torch.bool)}
    save_masks(tmp_path / "broken.safetensors", broken)
    with pytest.raises(InputError, match="not 2:4"):
        load_masks(tmp_path / "broken.safetensors")


def test_masked_tiny_sd_runs_forward():
    unet = build_unet("tiny-sd")
    inputs = example_unet_inputs(unet, 2)
    with torch.no_grad():
        dense = tensor_view(unet)(*inputs)
    masks = sparsify(unet, SparsityConfig(min_features=16))
    assert len(masks) > 40
    with torch.no_grad():
        out = tensor_view(unet)(*inputs)
    assert out.shape == dense.shape and torch.isfinite(out).all()
    assert (out - dense).abs().max() > 1e-3  # the masks changed the model
    assert check_2to4(unet, masks) == []


def test_conv1x1_as_linear_and_the_dense_stand_in_conversion():
    torch.manual_seed(0)
    conv = nn.Conv2d(32, 48, 1)
    x = torch.randn(2, 32, 5, 7)
    wrapped = SemiStructuredConv1x1(conv, conv.weight.detach().reshape(48, 32))
    torch.testing.assert_close(wrapped(x), conv(x), rtol=1e-5, atol=1e-5)

    unet = build_unet("tiny-sd")
    masks = sparsify(unet, SparsityConfig(min_features=16))
    inputs = example_unet_inputs(unet, 2)
    with torch.no_grad():
        before = tensor_view(unet)(*inputs)
    plan = to_semi_structured(unet, torch.float32, names=masks, backend="dense")
    assert "down_blocks.0.attentions.0.proj_in" in plan.convert
    assert "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj" in plan.convert
    assert plan.skipped["down_blocks.0.resnets.0.conv1"].startswith("conv 3x3")
    assert isinstance(unet.get_submodule("down_blocks.0.attentions.0.proj_in"), SemiStructuredConv1x1)
    with torch.no_grad():
        after = tensor_view(unet)(*inputs)
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5)


def test_plan_checks_cusparselt_shapes_and_masks():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 24), nn.Linear(24, 32), nn.Linear(32, 32))
    masks = sparsify(model, SparsityConfig(min_features=0))
    with torch.no_grad():
        model[3].weight.normal_()  # masked once, then dense again
    plan = plan_semi_structured(model, torch.float16, names=masks)
    assert plan.convert == ["0"]
    assert plan.skipped["1"].startswith("shape") and plan.skipped["2"].startswith("shape")  # 24 is not a multiple of 16
    assert plan.skipped["3"].startswith("dense")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error")
def test_to_semi_structured_needs_cuda():
    model = nn.Sequential(nn.Linear(32, 32))
    sparsify(model, SMALL)
    with pytest.raises(DeployKitError, match="CUDA"):
        to_semi_structured(model)


def test_config_is_validated_and_sparsegpt_needs_modelopt_and_data():
    with pytest.raises(InputError, match="unknown"):
        SparsityConfig(method="random")
    with pytest.raises(InputError, match="lists"):
        SparsityConfig(exclude="conv_in")
    model = nn.Sequential(nn.Linear(32, 32))
    with pytest.raises(InputError, match="forward_loop"):
        sparsify(model, SparsityConfig(method="sparsegpt", min_features=0))
    if importlib.util.find_spec("modelopt") is None:
        with pytest.raises(InputError, match="modelopt"):
            sparsify(model, SparsityConfig(method="sparsegpt", min_features=0), forward_loop=lambda m: None)
