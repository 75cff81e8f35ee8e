import copy

import pytest
import torch
from diffusers import DDPMScheduler

from deploykit.distill import RecoveryConfig, recover
from deploykit.prune import PruneConfig, prune_to_macs


def _batches(step, gen):
    # a fixed little "data set" of smooth blobs, drawn per step from the step's generator
    base = torch.linspace(-1, 1, 16)
    images = torch.stack([torch.tanh(3 * (base[None, :] ** 2 + base[:, None] ** 2 - r)) for r in (0.2, 0.4, 0.6, 0.8)])
    return images[torch.randint(0, 4, (8,), generator=gen)].unsqueeze(1)


@pytest.fixture
def pair(tiny_unet):
    student, _ = prune_to_macs(tiny_unet, (torch.randn(1, 1, 16, 16), torch.tensor([1])), PruneConfig(macs_target=0.5, round_to=4))
    return tiny_unet, student


def test_recovery_reduces_the_kd_loss(pair):
    teacher, student = pair
    _, losses = recover(student, teacher, DDPMScheduler(), _batches, RecoveryConfig(steps=40, lr=2e-3, warmup_steps=2, denoise_weight=0.0))
    first = sum(r["output_kd"] for r in losses[:8]) / 8
    last = sum(r["output_kd"] for r in losses[-8:]) / 8
    assert last < 0.7 * first
    assert all(set(r) == {"step", "loss", "denoise", "output_kd"} for r in losses)
    assert losses[-1]["loss"] == pytest.approx(losses[-1]["output_kd"]), "denoise_weight 0: only KD trains"


def test_a_killed_run_resumes_to_the_same_weights(pair, tmp_path):
    teacher, student = pair
    cfg = RecoveryConfig(steps=10, checkpoint_every=5, lr=1e-3, warmup_steps=2)
    uninterrupted, full_losses = recover(copy.deepcopy(student), teacher, DDPMScheduler(), _batches, cfg)

    class Killed(Exception):
        pass

    def kill_at_7(step, _):
        if step == 7:
            raise Killed

    with pytest.raises(Killed):
        recover(copy.deepcopy(student), teacher, DDPMScheduler(), _batches, cfg, tmp_path, on_step=kill_at_7)
    seen = []
    resumed, losses = recover(copy.deepcopy(student), teacher, DDPMScheduler(), _batches, cfg, tmp_path,
                              on_step=lambda s, _: seen.append(s))
    assert seen == [6, 7, 8, 9, 10], "must continue after the last checkpoint (step 5)"
    torch.testing.assert_close(resumed.state_dict(), uninterrupted.state_dict(), rtol=0, atol=0)
    assert [r["loss"] for r in losses] == pytest.approx([r["loss"] for r in full_losses], rel=0, abs=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.json", "step-10.safetensors"]


def test_loss_weights_turn_terms_off(pair):
    teacher, student = pair
    _, losses = recover(student, teacher, DDPMScheduler(), _batches, RecoveryConfig(steps=2, output_kd_weight=0))
    assert "output_kd" not in losses[0]
    assert losses[0]["loss"] == pytest.approx(losses[0]["denoise"])
