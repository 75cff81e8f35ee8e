"""The papers' criteria: each one's defining behaviour, and each one through `deploykit build`."""

import json
from types import SimpleNamespace

import pytest
import torch
from diffusers import DDPMScheduler
from torch import nn

from deploykit.prune import GradientData, available, get_criterion
from deploykit.prune.gradients import cap, diff_pruning, nici, nici_schedule


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
    assert {"magnitude", "random", "taylor", "diff-pruning", "nici", "cap"} <= set(available())
    assert not get_criterion("magnitude").needs_gradients
    for name in ("taylor", "diff-pruning", "nici", "cap"):
        assert get_criterion(name).needs_gradients


@pytest.mark.parametrize("criterion", ["magnitude", "random", "taylor", "diff-pruning", "nici", "cap"])
def test_every_criterion_runs_through_deploykit_build(criterion, tmp_path, zoo_env):
    from deploykit.recipe import load_recipe
    from deploykit.runner import build

    recipe_path = tmp_path / "r.yaml"
    recipe_path.write_text(f"name: c\nteacher: zoo:digits-tiny\nstages:\n  - stage: prune\n    criterion: {criterion}\n"
                           "    macs_target: 0.5\n    round_to: 4\n    batch_size: 8\n    gradient_batches: 2\n")
    report = build(load_recipe(recipe_path), recipe_path, tmp_path / "out")
    assert report["prune"]["criterion"] == criterion and report["macs_ratio"] <= 0.5
    prune_json = json.loads(next((tmp_path / "out" / "stages").glob("*-prune-*/prune.json")).read_text())
    assert (prune_json["criterion_seconds"] > 0) == get_criterion(criterion).needs_gradients
