import math

import pytest
import torch
from torch import nn

from deploykit.models import count_macs, count_params
from deploykit.prune import PruneConfig, available, prune_to_macs


def _example():
    return torch.randn(1, 1, 16, 16), torch.tensor([10])


def _forward_loop(model):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 1, 16, 16, generator=gen)
    t = torch.randint(0, 1000, (4,), generator=gen)
    model(x, t).sample.pow(2).mean().backward()


@pytest.mark.parametrize("criterion", ["magnitude", "random", "taylor"])
def test_each_criterion_reaches_the_macs_target_and_the_model_still_runs(tiny_unet, criterion):
    before = count_params(tiny_unet)
    pruned, result = prune_to_macs(tiny_unet, _example(), PruneConfig(criterion=criterion, macs_target=0.5, round_to=4),
                                   forward_loop=_forward_loop)
    assert result.macs_ratio <= 0.5
    assert result.macs_ratio == pytest.approx(count_macs(pruned, _example()) / count_macs(tiny_unet, _example()))
    assert result.params_after < result.params_before
    assert count_params(tiny_unet) == before, "the input model must not be modified"
    out = pruned(torch.randn(3, 1, 16, 16), torch.tensor([1, 500, 999])).sample
    assert out.shape == (3, 1, 16, 16) and torch.isfinite(out).all()


def test_widths_stay_multiples_of_round_to_and_groupnorm_groups(tiny_unet):
    pruned, _ = prune_to_macs(tiny_unet, _example(), PruneConfig(macs_target=0.4, round_to=8))
    step = math.lcm(8, 4)
    for name, m in pruned.named_modules():
        if isinstance(m, nn.Conv2d) and name not in ("conv_out",):
            assert m.out_channels % step == 0, (name, m.out_channels)
        if isinstance(m, nn.GroupNorm):
            assert m.num_channels % m.num_groups == 0, name


def test_ignored_layers_keep_their_output_channels(tiny_unet):
    pruned, _ = prune_to_macs(tiny_unet, _example(), PruneConfig(macs_target=0.5, round_to=4))
    kept, _ = prune_to_macs(tiny_unet, _example(), PruneConfig(macs_target=0.5, round_to=4, ignored=("conv_in",)))
    assert kept.conv_in.out_channels == tiny_unet.conv_in.out_channels
    assert pruned.time_embedding.linear_2.out_features == tiny_unet.time_embedding.linear_2.out_features
    assert pruned.conv_out.out_channels == 1
    # and something else did shrink
    assert pruned.down_blocks[1].resnets[0].conv1.out_channels < tiny_unet.down_blocks[1].resnets[0].conv1.out_channels


def test_search_bisects_on_measured_macs(tiny_unet):
    _, result = prune_to_macs(tiny_unet, _example(), PruneConfig(macs_target=0.6, round_to=4, tolerance=0, search_steps=6))
    trials = sorted(result.trials, key=lambda t: t["pruning_ratio"])
    macs = [t["macs_ratio"] for t in trials]
    assert macs == sorted(macs, reverse=True), "more pruning must never cost more MACs"
    assert any(t["macs_ratio"] > 0.6 for t in trials) and any(t["macs_ratio"] <= 0.6 for t in trials)


def test_gradient_criteria_need_a_forward_loop(tiny_unet):
    with pytest.raises(ValueError, match="forward_loop"):
        prune_to_macs(tiny_unet, _example(), PruneConfig(criterion="taylor"))


def test_unreachable_target_is_a_clear_error(tiny_unet):
    with pytest.raises(ValueError, match="could not reach"):
        prune_to_macs(tiny_unet, _example(), PruneConfig(macs_target=0.06, max_layer_ratio=0.3, search_steps=4))


def test_random_criterion_is_seeded(tiny_unet):
    a, _ = prune_to_macs(tiny_unet, _example(), PruneConfig(criterion="random", macs_target=0.5, round_to=4, seed=3))
    b, _ = prune_to_macs(tiny_unet, _example(), PruneConfig(criterion="random", macs_target=0.5, round_to=4, seed=3))
    torch.testing.assert_close(a.state_dict(), b.state_dict())


def test_criteria_are_registered_by_name():
    assert {"magnitude", "random", "taylor"} <= set(available())
