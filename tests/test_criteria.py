"""The papers' criteria: each one's defining behaviour, and each one through `deploykit build`."""

import json
from types import SimpleNamespace

import pytest
import torch
from diffusers import DDPMScheduler
from torch import nn

from deploykit.prune import GradientData, available, get_criterion
from deploykit.prune.blocks import (
    additive_removal_plan,
    block_removal_scores,
    calibration_forward,
    calibration_timesteps,
    rank_blocks,
    removable_blocks,
    removal_loss,
    removed_blocks,
)
from deploykit.prune.gradients import cap, diff_pruning, nici, nici_schedule
from deploykit.prune.importance import BlockRemovalImportance


class Scale(nn.Module):
    """eps(x, t) = w * x, recording what it was called with."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(1))
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, x, t):
        self.calls.append((x.detach().clone(), t.clone()))
        return SimpleNamespace(sample=self.w * x)


def _data(batch_size=8):
    images = torch.rand(32, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    return GradientData(images, DDPMScheduler(), batch_size=batch_size, batches=3, seed=0)


def test_diff_pruning_stops_accumulating_at_the_threshold():
    model, visited = Scale(), []
    diff_pruning(_data(), threshold=0.05, visited=visited)(model)
    losses = [loss for _, loss in visited]
    steps = [t for t, _ in visited]
    assert steps == list(range(len(steps))), "t = 0, 1, 2, ... with stride 1"
    assert 1 < len(steps) < 1000, "it stopped before the end"
    running_max = [max(losses[:i + 1]) for i in range(len(losses))]
    assert losses[-1] < 0.05 * running_max[-1], "the last step is the first under the threshold"
    assert all(loss >= 0.05 * m for loss, m in zip(losses[:-1], running_max[:-1]))
    assert len(model.calls) == len(steps) and model.w.grad is not None
    # the same noise and images at every step: only t changes
    first_t = [t for _, t in model.calls]
    assert all((t == t[0]).all() for t in first_t)

    loose = []
    diff_pruning(_data(), threshold=0.5, visited=loose)(Scale())
    assert len(loose) < len(steps), "a higher threshold stops earlier"


def test_nici_visits_the_interval_schedule_on_clean_images_with_damped_weights():
    schedule = nici_schedule(1000)
    assert schedule[:3] == [0, 2, 4] and 250 in schedule and 252 not in schedule and 254 in schedule
    for lo, hi, stride in ((0, 250, 2), (250, 500, 4), (500, 750, 8), (750, 1000, 16)):
        assert [t for t in schedule if lo <= t < hi] == list(range(lo, hi, stride))
    assert len(schedule) == 125 + 63 + 32 + 16

    data, model, visited = _data(), Scale(), []
    nici(data, visited=visited)(model)
    assert [t for t, _ in visited] == schedule
    weights = [w for _, w in visited]
    assert weights[0] == pytest.approx(1.0, abs=1e-3) and weights[-1] < 0.01
    assert weights == sorted(weights, reverse=True), "later timesteps count less"
    images = set(tuple(x.flatten().tolist()) for x in data.images)
    assert all(tuple(x[0].flatten().tolist()) in images for x, _ in model.calls), "inputs are the clean images"
    # the weighting is applied: d/dw of sum_t w_t * mean((w x)^2) at w = 1 is 2 * sum_t w_t * mean(x^2)
    x0 = model.calls[0][0]
    assert model.w.grad.item() == pytest.approx(2 * sum(weights) * x0.pow(2).mean().item(), rel=1e-4)


def test_cap_scores_respond_to_the_perturbation():
    grads = {}
    for sigma in (0.0, 0.05, 0.2):
        model = Scale()
        cap(_data(), sigma=sigma)(model)
        grads[sigma] = model.w.grad.abs().item()
    assert grads[0.0] == 0.0
    assert 0 < grads[0.05] < grads[0.2]


def test_criteria_are_registered_with_their_gradient_loops():
    assert {"magnitude", "random", "taylor", "diff-pruning", "nici", "cap", "block-removal"} <= set(available())
    assert not get_criterion("magnitude").needs_data
    for name in ("taylor", "diff-pruning", "nici", "cap"):
        assert get_criterion(name).needs_gradients and not get_criterion(name).needs_calibration
    block_removal = get_criterion("block-removal")
    assert block_removal.needs_calibration and not block_removal.needs_gradients
    assert isinstance(block_removal.factory(), BlockRemovalImportance)


# --- block removal (LAPTOP-Diff) ---

IDENTITY = "mid_block.resnets.1"  # a removable ResnetBlock2D of the digits-tiny UNet, made an exact identity below


def _calibration(in_channels=1, size=16, conditioning=()):
    images = torch.rand(8, in_channels, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    return calibration_forward(GradientData(images, DDPMScheduler(), batch_size=4, batches=2, seed=0,
                                            conditioning=conditioning))


def _with_identity_block(unet):
    block = dict(unet.named_modules())[IDENTITY]
    with torch.no_grad():  # conv2 = 0: the block's output is its input (residual path only)
        block.conv2.weight.zero_()
        block.conv2.bias.zero_()
    return unet


def test_removable_blocks_of_a_pixel_unet(tiny_unet):
    from diffusers.models.attention_processor import Attention
    from diffusers.models.resnet import ResnetBlock2D

    found = removable_blocks(tiny_unet)
    modules = dict(tiny_unet.named_modules())
    resnets = {n for n, m in modules.items() if isinstance(m, ResnetBlock2D) and m.conv_shortcut is None}
    attentions = {n for n, m in modules.items() if isinstance(m, Attention) and m.residual_connection}
    assert set(found) == resnets | attentions and resnets and attentions
    assert all(modules[n].conv_shortcut is not None for n, m in modules.items()
               if isinstance(m, ResnetBlock2D) and n not in found), "channel-changing resnets are not removable"


def test_an_identity_block_scores_zero_and_ranks_last(tiny_unet):
    unet, forward = _with_identity_block(tiny_unet), _calibration()
    scores = block_removal_scores(unet, forward)
    assert set(scores) == set(removable_blocks(unet))
    assert scores[IDENTITY] < 1e-10
    assert all(score > 1e-8 for name, score in scores.items() if name != IDENTITY), "the other blocks matter"
    ranking = rank_blocks(scores)
    assert ranking[0][0] == IDENTITY, "least important first"
    assert [s for _, s in ranking] == sorted(scores.values())
    assert block_removal_scores(unet, forward) == scores, "deterministic"
    # removing the identity block too changes nothing: the pair costs exactly the other block's loss
    other = ranking[-1][0]
    assert removal_loss(unet, forward, [IDENTITY, other]) == pytest.approx(scores[other], rel=1e-5)


def test_scoring_leaves_the_model_as_it_was(tiny_unet):
    forward = _calibration()
    tiny_unet.train()
    with torch.no_grad():
        before = forward(tiny_unet)
    scores = block_removal_scores(tiny_unet, forward)
    assert tiny_unet.training, "the mode is restored"
    assert not any(m._forward_hooks for m in tiny_unet.modules()), "no hook left behind"
    with torch.no_grad():
        assert torch.equal(forward(tiny_unet), before)
        with removed_blocks(tiny_unet, [rank_blocks(scores)[-1][0]]):
            assert not torch.equal(forward(tiny_unet), before), "while removed, the output does change"
        assert torch.equal(forward(tiny_unet), before)


def test_calibration_inputs_are_fixed_and_spread_over_the_schedule():
    assert calibration_timesteps(1000, 4) == [125, 375, 625, 875]

    class TupleScale(Scale):  # called as diffusers UNets are: return_dict=False gives a tuple
        def forward(self, x, t, return_dict=True):
            return (super().forward(x, t).sample,)

    model = TupleScale()
    forward = _calibration()
    first, second = forward(model), forward(model)
    assert torch.equal(first, second)
    assert [t[0].item() for _, t in model.calls[:2]] == calibration_timesteps(1000, 2)


def test_block_removal_importance_spreads_block_scores_over_channels(tiny_unet):
    import torch_pruning as tp

    from deploykit.models.wrappers import TensorOutput

    unet = _with_identity_block(tiny_unet)
    importance = BlockRemovalImportance()
    record = importance.calibrate(unet, _calibration())
    assert [r["block"] for r in record["block_ranking"]][0] == IDENTITY
    scores = importance.scores
    DG = tp.DependencyGraph().build_dependency(TensorOutput(unet), example_inputs=(torch.randn(1, 1, 16, 16),
                                                                                   torch.tensor([10])))
    modules = dict(unet.named_modules())

    def conv1_group(name):  # conv1 out -> norm2, time_emb_proj out, conv2 in: all inside the block
        conv1 = modules[name].conv1
        return DG.get_pruning_group(conv1, tp.prune_conv_out_channels, list(range(conv1.out_channels)))

    def share(w):
        n = w.flatten(1).norm(dim=1)
        return n / n.sum()

    # the identity block's channels score 0 though its conv1 and time projection weights are not 0
    identity = importance(conv1_group(IDENTITY))
    assert modules[IDENTITY].conv1.weight.abs().sum() > 0 and torch.all(identity == 0)
    # another block: S_b x each layer's channel share, summed over the group
    other = "mid_block.resnets.0"
    block = modules[other]
    expected = scores[other] * (share(block.conv1.weight) + share(block.time_emb_proj.weight)
                                + share(block.conv2.weight.transpose(0, 1)))
    assert torch.allclose(importance(conv1_group(other)), expected, rtol=1e-5)
    # a layer in no removable block is essential: it takes the largest block score
    lin = unet.time_embedding.linear_1
    group = DG.get_pruning_group(lin, tp.prune_linear_out_channels, list(range(lin.out_features)))
    expected = max(scores.values()) * (share(lin.weight) + share(unet.time_embedding.linear_2.weight.t()))
    assert torch.allclose(importance(group), expected, rtol=1e-5)


def test_block_removal_needs_its_calibration(tiny_unet):
    from deploykit.prune import PruneConfig, prune_to_macs

    inputs = (torch.randn(1, 1, 16, 16), torch.tensor([10]))
    with pytest.raises(ValueError, match="calibration"):
        prune_to_macs(tiny_unet, inputs, PruneConfig(criterion="block-removal", round_to=4))
    with pytest.raises(RuntimeError, match="calibrate"):
        BlockRemovalImportance()(None)


@pytest.mark.parametrize("topology", ["tiny-sd", "tiny-sdxl"])
@pytest.mark.filterwarnings("ignore:`Transformer2DModelOutput` is deprecated:FutureWarning")  # diffusers' own return
def test_transformer_blocks_of_sd_unets_get_scores(topology):
    from diffusers.models.modeling_outputs import Transformer2DModelOutput
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    from deploykit.models.inputs import example_unet_inputs
    from deploykit.models.topologies import build_unet

    unet = build_unet(topology).eval()
    conditioning = example_unet_inputs(unet, 1, 8)[2:]  # encoder_hidden_states (+ SDXL's text_embeds, time_ids)
    scores = block_removal_scores(unet, _calibration(4, 8, conditioning))
    transformers = {n for n, m in unet.named_modules() if isinstance(m, Transformer2DModel)}
    assert transformers and transformers <= set(scores)
    assert all(0 < scores[n] < float("inf") for n in transformers)
    # the hook answers in the block's own output structure, return_dict or not
    name = sorted(transformers)[0]
    block = dict(unet.named_modules())[name]
    x = torch.randn(2, block.config.in_channels, 4, 4)
    ehs = torch.randn(2, 3, unet.config.cross_attention_dim)
    with removed_blocks(unet, [name]), torch.no_grad():
        out = block(x, encoder_hidden_states=ehs)
        assert isinstance(out, Transformer2DModelOutput) and torch.equal(out.sample, x)
        out = block(x, encoder_hidden_states=ehs, return_dict=False)
        assert isinstance(out, tuple) and len(out) == 1 and torch.equal(out[0], x)


def test_additive_removal_plan_takes_the_least_loss_per_cost():
    scores = {"a": 0.0, "b": 1.0, "c": 3.0, "d": 10.0}
    cost = {"a": 1.0, "b": 4.0, "c": 4.0, "d": 8.0}
    plan = additive_removal_plan(scores, cost, budget=5)
    assert plan.blocks == ["a", "b"] and plan.predicted_loss == 1.0 and plan.saved == 5.0
    plan = additive_removal_plan(scores, cost, budget=8)
    assert plan.blocks == ["a", "b", "c"] and plan.predicted_loss == 4.0 and plan.saved == 9.0
    # greedy by loss per cost takes a (1 per unit), then b (1.25): once b is in, a is not needed
    plan = additive_removal_plan({"a": 1.0, "b": 5.0}, {"a": 1.0, "b": 4.0}, budget=4)
    assert plan.blocks == ["b"] and plan.predicted_loss == 5.0
    with pytest.raises(ValueError):
        additive_removal_plan(scores, cost, budget=100)


@pytest.mark.parametrize("criterion", ["magnitude", "random", "taylor", "diff-pruning", "nici", "cap", "block-removal"])
def test_every_criterion_runs_through_deploykit_build(criterion, tmp_path, zoo_env):
    from deploykit.recipe import load_recipe
    from deploykit.runner import build

    recipe_path = tmp_path / "r.yaml"
    recipe_path.write_text(f"name: c\nteacher: zoo:digits-tiny\nstages:\n  - stage: prune\n    criterion: {criterion}\n"
                           "    macs_target: 0.5\n    round_to: 4\n    batch_size: 8\n    gradient_batches: 2\n")
    report = build(load_recipe(recipe_path), recipe_path, tmp_path / "out")
    assert report["prune"]["criterion"] == criterion and report["macs_ratio"] <= 0.5
    prune_json = json.loads(next((tmp_path / "out" / "stages").glob("*-prune-*/prune.json")).read_text())
    assert (prune_json["criterion_seconds"] > 0) == get_criterion(criterion).needs_data
    assert ("block_ranking" in prune_json) == (criterion == "block-removal")
    if criterion == "block-removal":
        ranking = prune_json["block_ranking"]
        assert len(ranking) == 8 and [r["score"] for r in ranking] == sorted(r["score"] for r in ranking)


def test_block_removal_calibrates_sd_unets_through_deploykit_build(tmp_path):
    """The prune stage feeds an SD UNet its text conditioning (no data set: noise latents)."""
    from deploykit.recipe import load_recipe
    from deploykit.runner import build

    recipe_path = tmp_path / "r.yaml"
    recipe_path.write_text("name: c\nteacher: random:tiny-sd\nresolution: 32\nstages:\n  - stage: prune\n"
                           "    criterion: block-removal\n    macs_target: 0.6\n    round_to: 4\n    batch_size: 2\n"
                           "    gradient_batches: 2\n")
    report = build(load_recipe(recipe_path), recipe_path, tmp_path / "out")
    assert report["macs_ratio"] <= 0.6
    prune_json = json.loads(next((tmp_path / "out" / "stages").glob("*-prune-*/prune.json")).read_text())
    blocks = {r["block"] for r in prune_json["block_ranking"]}
    assert {"down_blocks.0.attentions.0", "mid_block.attentions.0"} <= blocks and prune_json["criterion_seconds"] > 0
