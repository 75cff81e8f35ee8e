import copy
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from diffusers import DDPMScheduler

from deploykit.distill import DistillConfig, distill
from deploykit.io import load_tensors
from deploykit.prune import PruneConfig, prune_to_macs
from tests.conftest import REPO


def _batches(step, gen):
    # a fixed little "data set" of smooth blobs, drawn per step from the step's generator
    base = torch.linspace(-1, 1, 16)
    images = torch.stack([torch.tanh(3 * (base[None, :] ** 2 + base[:, None] ** 2 - r)) for r in (0.2, 0.4, 0.6, 0.8)])
    return images[torch.randint(0, 4, (8,), generator=gen)].unsqueeze(1)


@pytest.fixture(scope="module")
def pruned_pair():
    from diffusers import UNet2DModel

    from tests.conftest import TINY_UNET

    torch.manual_seed(0)
    teacher = UNet2DModel(**TINY_UNET).eval()
    student, _ = prune_to_macs(teacher, (torch.randn(1, 1, 16, 16), torch.tensor([1])), PruneConfig(macs_target=0.5, round_to=4))
    return teacher, student


@pytest.fixture
def pair(pruned_pair):
    """The tiny teacher and its pruned student, pruned once per module; fresh copies for every test."""
    return tuple(copy.deepcopy(m) for m in pruned_pair)


def test_distill_reduces_the_kd_loss(pair):
    teacher, student = pair
    _, losses = distill(student, teacher, DDPMScheduler(), _batches, DistillConfig(steps=40, lr=2e-3, warmup_steps=2, denoise_weight=0.0))
    first = sum(r["output_kd"] for r in losses[:8]) / 8
    last = sum(r["output_kd"] for r in losses[-8:]) / 8
    assert last < 0.7 * first
    assert all(set(r) == {"step", "loss", "denoise", "output_kd"} for r in losses)
    assert losses[-1]["loss"] == pytest.approx(losses[-1]["output_kd"]), "denoise_weight 0: only KD trains"


def test_a_killed_run_resumes_to_the_same_weights(pair, tmp_path):
    teacher, student = pair
    cfg = DistillConfig(steps=10, checkpoint_every=5, lr=1e-3, warmup_steps=2)
    uninterrupted, full_losses = distill(copy.deepcopy(student), teacher, DDPMScheduler(), _batches, cfg)

    class Killed(Exception):
        pass

    def kill_at_7(step, _):
        if step == 7:
            raise Killed

    with pytest.raises(Killed):
        distill(copy.deepcopy(student), teacher, DDPMScheduler(), _batches, cfg, tmp_path, on_step=kill_at_7)
    seen = []
    resumed, losses = distill(copy.deepcopy(student), teacher, DDPMScheduler(), _batches, cfg, tmp_path,
                              on_step=lambda s, _: seen.append(s))
    assert seen == [6, 7, 8, 9, 10], "must continue after the last checkpoint (step 5)"
    torch.testing.assert_close(resumed.state_dict(), uninterrupted.state_dict(), rtol=0, atol=0)
    assert [r["loss"] for r in losses] == pytest.approx([r["loss"] for r in full_losses], rel=0, abs=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.json", "step-10.safetensors"]


def test_loss_weights_turn_terms_off(pair):
    teacher, student = pair
    _, losses = distill(student, teacher, DDPMScheduler(), _batches, DistillConfig(steps=2, output_kd_weight=0))
    assert "output_kd" not in losses[0]
    assert losses[0]["loss"] == pytest.approx(losses[0]["denoise"])


# --- DaKD: each loss term's defining property -------------------------------------------------------

def test_feature_kd_is_the_relative_error_against_the_teacher():
    from deploykit.distill.losses import normalized_feature_loss

    teacher = torch.randn(3, 8, 4, 4)
    student = teacher + 0.1 * torch.randn(3, 8, 4, 4)
    assert normalized_feature_loss(teacher, teacher).item() == 0.0
    assert normalized_feature_loss(torch.zeros_like(teacher), teacher).item() == pytest.approx(1.0)
    # normalised by the teacher's norm: the same relative mismatch costs the same at any feature scale
    assert normalized_feature_loss(1000 * student, 1000 * teacher).item() == pytest.approx(
        normalized_feature_loss(student, teacher).item(), rel=1e-5)
    tokens = torch.randn(2, 16, 8)  # attention outputs: (batch, tokens, channels)
    assert normalized_feature_loss(tokens, tokens).item() == 0.0


def test_distribution_kd_compares_where_the_noise_is_not_its_offset():
    from deploykit.distill.losses import distribution_kd_loss

    eps_t = torch.randn(2, 4, 8, 8)
    assert distribution_kd_loss(eps_t, eps_t, 1.0).item() == pytest.approx(0.0, abs=1e-6)
    # a softmax over positions ignores a per-channel offset
    assert distribution_kd_loss(eps_t + torch.randn(2, 4, 1, 1), eps_t, 1.0).item() == pytest.approx(0.0, abs=1e-5)
    bump = torch.zeros(1, 1, 8, 8)
    bump[..., 2, 3] = 1.0
    small, large = distribution_kd_loss(eps_t + bump, eps_t, 1.0), distribution_kd_loss(eps_t + 3 * bump, eps_t, 1.0)
    assert 0 < small < large
    # a sharper softmax (lower tau) weighs the same difference more, before the tau^2 scaling
    assert distribution_kd_loss(eps_t + bump, eps_t, 0.5) / 0.25 > distribution_kd_loss(eps_t + bump, eps_t, 2.0) / 4


def test_hinge_losses():
    from deploykit.distill.losses import discriminator_hinge_loss, generator_hinge_loss

    assert discriminator_hinge_loss(torch.tensor([2.0]), torch.tensor([-3.0])).item() == 0.0  # both beyond the margin
    assert discriminator_hinge_loss(torch.tensor([0.0]), torch.tensor([0.0])).item() == 2.0
    assert generator_hinge_loss(torch.tensor([1.5, 0.5])).item() == -1.0


class _Calls:
    def __init__(self, module):
        self.n = 0
        module.register_forward_hook(lambda *_: setattr(self, "n", self.n + 1))


def test_a_zero_weight_is_neither_computed_nor_counted(pair):
    teacher, student = pair
    hooks = lambda model: sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())  # noqa: E731
    before = hooks(teacher), hooks(student)
    calls = _Calls(teacher)
    _, losses = distill(copy.deepcopy(student), teacher, DDPMScheduler(), _batches,
                        DistillConfig(steps=2, output_kd_weight=0, checkpoint_every=100))
    assert calls.n == 0, "denoising alone must not run the teacher"
    assert set(losses[0]) == {"step", "loss", "denoise"}

    weights = dict(denoise_weight=0.5, output_kd_weight=0, feature_kd_weight=2.0, attention_kd_weight=0,
                   distribution_kd_weight=3.0)
    tapped = copy.deepcopy(student)
    _, losses = distill(tapped, teacher, DDPMScheduler(), _batches, DistillConfig(steps=2, checkpoint_every=100, **weights))
    assert calls.n > 0
    rec = losses[-1]
    assert set(rec) == {"step", "loss", "denoise", "feature_kd", "distribution_kd"}
    assert rec["loss"] == pytest.approx(0.5 * rec["denoise"] + 2.0 * rec["feature_kd"] + 3.0 * rec["distribution_kd"], rel=1e-5)
    # the taps are gone from both models afterwards (the teacher keeps only the call counter)
    assert (hooks(teacher), hooks(tapped)) == (before[0] + 1, before[1])


def test_feature_taps_project_the_pruned_widths(pair):
    """The pruned student is narrower at every block output and attention: each tap gets a projection."""
    from deploykit.distill import DistillTrainer

    teacher, student = pair
    trainer = DistillTrainer(copy.deepcopy(student), teacher, DDPMScheduler(), _batches,
                             DistillConfig(steps=1, feature_kd_weight=1.0, attention_kd_weight=1.0, checkpoint_every=100))
    trainer.train()
    heads = trainer.accelerator.unwrap_model(trainer.model).projections
    assert {"down_blocks_0", "mid_block", "up_blocks_2", "mid_block_attentions_0"} <= set(heads)
    assert heads["down_blocks_0"].linear.weight.shape == (16, 8)  # student 8 channels -> teacher 16


def test_the_discriminator_waits_for_its_warmup(pair):
    from deploykit.distill import DistillTrainer

    teacher, student = pair
    snapshots = {}

    def snapshot(step, record):
        d = trainer.discriminator
        snapshots[step] = ({k: v.clone() for k, v in d.state_dict().items()}, len(trainer.disc_optimizer.state), record)

    trainer = DistillTrainer(copy.deepcopy(student), teacher, DDPMScheduler(), _batches,
                             DistillConfig(steps=4, adversarial_weight=0.1, adversarial_warmup=2, checkpoint_every=100),
                             on_step=snapshot)
    trainer.train()
    for step in (1, 2):
        weights, opt_state, record = snapshots[step]
        assert opt_state == 0 and "adversarial" not in record and "discriminator" not in record
        torch.testing.assert_close(weights, snapshots[1][0], rtol=0, atol=0)
    weights, opt_state, record = snapshots[3]
    assert opt_state > 0 and {"adversarial", "discriminator"} <= set(record)
    assert any(not torch.equal(weights[k], snapshots[2][0][k]) for k in weights)


def test_ema_weights_are_what_distill_returns(pair):
    teacher, student = pair
    raw = []

    def keep(step, record):
        raw.append({k: v.detach().clone() for k, v in trained.state_dict().items()})

    trained = copy.deepcopy(student)
    result, _ = distill(trained, teacher, DDPMScheduler(), _batches,
                        DistillConfig(steps=3, lr=1e-2, warmup_steps=0, ema_decay=0.5, checkpoint_every=100), on_step=keep)
    # diffusers' EMAModel: update k (1-based) uses decay min(ema_decay, k / (9 + k)), 0 at the first
    expected = {k: v.clone() for k, v in raw[0].items()}
    for k_update, weights in enumerate(raw[1:], start=2):
        decay = min(0.5, k_update / (9 + k_update))
        expected = {k: decay * expected[k] + (1 - decay) * weights[k] for k in expected}
    torch.testing.assert_close(result.state_dict(), expected, rtol=1e-5, atol=1e-6)
    assert any(not torch.allclose(result.state_dict()[k], raw[-1][k]) for k in expected)


def test_gradient_accumulation_matches_one_big_batch(pair):
    teacher, student = pair
    cfg = dict(steps=2, lr=1e-3, warmup_steps=0, feature_kd_weight=0.5, checkpoint_every=100)
    whole, whole_losses = distill(copy.deepcopy(student), teacher, DDPMScheduler(), _batches, DistillConfig(**cfg))
    accumulated, losses = distill(copy.deepcopy(student), teacher, DDPMScheduler(), _batches,
                                  DistillConfig(gradient_accumulation=2, **cfg))
    # Adam divides by sqrt(v): where a gradient is near 0, summation-order noise (one thread or two) moves
    # a weight by ~3e-6; a step moves weights by ~lr = 1e-3, so 1e-5 still tells a wrong accumulation apart
    torch.testing.assert_close(accumulated.state_dict(), whole.state_dict(), rtol=1e-4, atol=1e-5)
    assert [r["loss"] for r in losses] == pytest.approx([r["loss"] for r in whole_losses], rel=1e-5)  # logged: whole batch
    changed = copy.deepcopy(student).state_dict()
    assert any(not torch.allclose(whole.state_dict()[k], changed[k]) for k in changed)


@pytest.mark.parametrize("mode", ["fixed", "sr-ste"])
def test_2to4_masks_survive_dakd_with_ema(pair, mode):
    from deploykit.sparsity import SparsityConfig, check_2to4, sparsify

    teacher, student = pair
    student = copy.deepcopy(student)
    masks = sparsify(student, SparsityConfig(min_features=8))
    assert masks
    distilled, _ = distill(student, teacher, DDPMScheduler(), _batches,
                           DistillConfig(steps=3, lr=1e-2, mask_mode=mode, feature_kd_weight=0.5, ema_decay=0.9,
                                          checkpoint_every=100), masks=masks)
    assert check_2to4(distilled, masks) == []
    assert all((distilled.get_submodule(n).weight[~m] == 0).all() for n, m in masks.items())


def test_bf16_autocast_trains_an_fp32_student(pair):
    teacher, student = pair
    distilled, losses = distill(copy.deepcopy(student), teacher, DDPMScheduler(), _batches,
                                DistillConfig(steps=2, mixed_precision="bf16", feature_kd_weight=0.5, checkpoint_every=100))
    assert all(torch.isfinite(torch.tensor(list(r.values()))).all() for r in losses)
    assert all(p.dtype == torch.float32 for p in distilled.parameters())


# --- the stage: kill and resume, DDP under accelerate launch, Stable Diffusion prompts, the recipe --------

DAKD_RECIPE = """\
name: dakd
teacher: {teacher}
{extra}seed: 0
stages:
  - stage: prune
    macs_target: 0.5
    round_to: 4
  - stage: distill
    steps: {steps}
    batch_size: 8
    checkpoint_every: {every}
    feature_kd_weight: 0.5
    attention_kd_weight: 0.5
    distribution_kd_weight: 1.0
    adversarial_weight: 0.1
    adversarial_warmup: 2
    ema_decay: 0.9
{distill_extra}"""


def _recipe(folder: Path, teacher: str = "zoo:digits-tiny", steps: int = 3, every: int = 50, extra: str = "",
            distill_extra: str = "") -> Path:
    path = folder / "recipe.yaml"
    path.write_text(DAKD_RECIPE.format(teacher=teacher, steps=steps, every=every, extra=extra, distill_extra=distill_extra))
    return path


def _build(recipe: Path, out: Path) -> str:
    """An in-process build; returns what it printed."""
    import io

    from rich.console import Console

    from deploykit.recipe import load_recipe
    from deploykit.runner import build

    log = io.StringIO()
    build(load_recipe(recipe), recipe, out, Console(file=log, width=200))
    return log.getvalue()


def _distill_json(out: Path) -> dict:
    return json.loads(next((out / "stages").glob("*-distill-*/distill.json")).read_text())


def _seed_cache(source: Path, dest: Path, *names: str) -> None:
    """Copy finished stages into another artifact folder, where the runner reuses them (content-keyed)."""
    for name in names:
        stage = next((source / "stages").glob(f"*-{name}-*"))
        shutil.copytree(stage, dest / "stages" / stage.name)


def test_a_killed_distill_resumes_the_same_run(tmp_path, zoo_env):
    """SIGKILL mid-run, run again: the losses after the checkpoint and the weights are the uninterrupted run's."""
    recipe = _recipe(tmp_path, steps=20, every=2)
    reference = tmp_path / "reference"
    _build(recipe, reference)
    out = tmp_path / "killed"
    _seed_cache(reference, out, "teacher", "prune")
    proc = subprocess.Popen([sys.executable, "-m", "deploykit.cli", "build", str(recipe), "--out", str(out)], env=zoo_env,
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline, killed_at = time.time() + 300, None
    try:
        while time.time() < deadline and killed_at is None:
            found = list(out.glob("stages/.work-distill-*/checkpoints/checkpoint.json"))
            if found:
                killed_at = json.loads(found[0].read_text())["step"]
                os.killpg(proc.pid, signal.SIGKILL)
            assert proc.poll() is None, "the build ended before it could be killed"
            time.sleep(0.02)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert killed_at is not None and 2 <= killed_at < 20 and proc.returncode == -signal.SIGKILL

    log = _build(recipe, out)
    resumed_from = int(re.search(r"resuming from the checkpoint at step (\d+)", log).group(1))
    assert resumed_from >= killed_at
    ours, theirs = _distill_json(out)["losses"], _distill_json(reference)["losses"]
    assert [r["step"] for r in ours] == list(range(1, 21))
    for a, b in zip(ours[resumed_from:], theirs[resumed_from:]):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-7), f"step {a['step']}"
    torch.testing.assert_close(load_tensors(out / "model" / "model.safetensors"),
                               load_tensors(reference / "model" / "model.safetensors"), rtol=0, atol=1e-6)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_under_accelerate_launch_end_with_the_same_weights(tmp_path, zoo_env):
    """`accelerate launch` of the build, 2 CPU processes over gloo: DDP keeps both ranks' weights equal, and
    the run matches one process on the same batches."""
    recipe = _recipe(tmp_path, steps=3, distill_extra="    gradient_accumulation: 2\n")
    out = tmp_path / "ddp"
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", str(_free_port()), "-m", "deploykit.cli", "build", str(recipe), "--out", str(out)]
    result = subprocess.run(launch, env={**zoo_env, "OMP_NUM_THREADS": "1"}, cwd=REPO, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 processes (MULTI_CPU)" in result.stderr
    record = _distill_json(out)
    assert record["processes"] == 2
    assert len(record["replica_digests"]) == 2 and len(set(record["replica_digests"])) == 1, "the ranks diverged"
    trained = load_tensors(out / "model" / "model.safetensors")
    pruned = load_tensors(next((out / "stages").glob("*-prune-*")) / "model" / "model.safetensors")
    assert any(not torch.equal(trained[k], pruned[k]) for k in trained), "distill did not train"
    assert (out / "plots" / "distill_loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    one = tmp_path / "one"
    _seed_cache(out, one, "teacher", "prune")
    _build(recipe, one)
    single = _distill_json(one)
    assert single["processes"] == 1
    for a, b in zip(record["losses"], single["losses"]):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-6)
    torch.testing.assert_close(trained, load_tensors(one / "model" / "model.safetensors"), rtol=1e-4, atol=1e-5)


def test_prompt_batches_carry_each_rows_conditioning_and_some_empty_prompts():
    from deploykit.distill import Batch
    from deploykit.stages.distill import _prompt_batches

    n = 50
    tensors = {"sample": torch.randn(n, 4, 8, 8), "cond.encoder_hidden_states": torch.arange(n).float().view(n, 1, 1).expand(n, 3, 2),
               "uncond.encoder_hidden_states": torch.full((1, 3, 2), -1.0)}
    batch = _prompt_batches(tensors, 2000)(0, torch.Generator().manual_seed(0))
    assert isinstance(batch, Batch) and batch.sample.shape == (2000, 4, 8, 8)
    emb = batch.cond["encoder_hidden_states"]
    rows = emb[:, 0, 0]
    empty = rows == -1
    assert 0.07 < empty.float().mean() < 0.13  # one row in ten is unconditional, for classifier-free guidance
    index = torch.stack([torch.nonzero((tensors["sample"] == s).flatten(1).all(1))[0, 0] for s in batch.sample[:50]])
    assert torch.equal(rows[:50][~empty[:50]], index[~empty[:50]].float())  # each row's own prompt


def test_a_stable_diffusion_teacher_distils_on_a_prompt_file(tmp_path):
    (tmp_path / "prompts.txt").write_text("a red bicycle\n\na cat on a sofa\n")
    recipe = _recipe(tmp_path, teacher="random:tiny-sd", steps=3, extra="resolution: 32\n",
                     distill_extra="    prompts: prompts.txt\n    teacher_samples: 4\n    teacher_sample_steps: 2\n")
    out = tmp_path / "out"
    log = _build(recipe, out)
    assert "generating 4 teacher samples from 2 prompts" in log
    record = _distill_json(out)
    assert len(record["losses"]) == 3 and {"feature_kd", "attention_kd", "distribution_kd"} <= set(record["losses"][-1])
    assert all(math.isfinite(v) for v in record["losses"][-1].values())
    # the prompt file's content is part of the stage's key: an edit runs distill again, not prune
    (tmp_path / "prompts.txt").write_text("a lighthouse at dusk\n")
    log = _build(recipe, out)
    assert "prune: up to date" in log and "distill: up to date" not in log
    assert "generating 4 teacher samples from 1 prompts" in log


@pytest.mark.parametrize("teacher, extra, distill, steps, message", [
    ("zoo:digits", "target: cpu\n", "    mixed_precision: bf16\n", 5, "distill.mixed_precision bf16 needs target cuda"),
    ("zoo:digits", "", "    gradient_accumulation: 3\n", 5, "does not split into gradient_accumulation 3"),
    ("zoo:digits", "", "", 2, "would never start"),  # the recipe's adversarial_warmup: 2
])
def test_bad_distill_settings_are_named(tmp_path, teacher, extra, distill, steps, message):
    from deploykit.errors import InputError
    from deploykit.recipe import load_recipe

    recipe = _recipe(tmp_path, teacher=teacher, steps=steps, extra=extra, distill_extra=distill)
    with pytest.raises(InputError, match=message):
        load_recipe(recipe)


@pytest.mark.parametrize("teacher, distill, message", [
    ("random:tiny-sd", "", "distill.prompts: Stable Diffusion teachers are distilled on prompts"),
    ("random:tiny-sd", "    prompts: missing.txt\n", "prompts: file not found"),
    ("random:tiny-sd", "    prompts: empty.txt\n", "prompts: empty.txt has no text"),
    ("zoo:digits", "    prompts: prompts.txt\n", "distill.prompts is for Stable Diffusion teachers"),
])
def test_prompt_files_are_checked_before_anything_is_written(tmp_path, teacher, distill, message):
    from deploykit.errors import InputError

    (tmp_path / "prompts.txt").write_text("a cat\n")
    (tmp_path / "empty.txt").write_text("\n  \n")
    recipe = _recipe(tmp_path, teacher=teacher, extra="resolution: 32\n" if "sd" in teacher else "", distill_extra=distill)
    with pytest.raises(InputError, match=message):
        _build(recipe, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_the_sd_dakd_recipe_is_valid_and_its_prompt_file_reads():
    from deploykit.recipe import load_recipe
    from deploykit.stages.data import read_prompts

    recipe = load_recipe(REPO / "recipes" / "sd15_dakd_gpu.yaml")
    distill = recipe.stage("distill")
    assert len(read_prompts(REPO / "recipes" / distill.prompts)) >= 32


def test_denoising_targets_follow_the_prediction_type():
    from deploykit.models.objectives import denoising_target

    x0, noise, t = torch.randn(4, 1, 8, 8), torch.randn(4, 1, 8, 8), torch.tensor([0, 300, 600, 999])
    eps, v = DDPMScheduler(), DDPMScheduler(prediction_type="v_prediction")
    assert denoising_target(eps, x0, noise, t) is noise
    ab = v.alphas_cumprod[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(denoising_target(v, x0, noise, t), ab.sqrt() * noise - (1 - ab).sqrt() * x0)
    assert denoising_target(DDPMScheduler(prediction_type="sample"), x0, noise, t) is x0
    with pytest.raises(ValueError, match="prediction_type 'flow'"):
        denoising_target(type("S", (), {"config": type("C", (), {"prediction_type": "flow"})})(), x0, noise, t)


def test_recovery_regresses_a_v_prediction_teachers_target(pair):
    """A student that predicts zero misses epsilon by E[noise^2] = 1, but v by E[alpha_bar] on clean zeros:
    the denoising term must measure the target the teacher's scheduler samples with."""
    teacher, student = pair
    with torch.no_grad():
        student.conv_out.weight.zero_()
        student.conv_out.bias.zero_()
    zeros = lambda step, gen: torch.zeros(64, 1, 16, 16)  # noqa: E731
    cfg = DistillConfig(steps=1, output_kd_weight=0)
    denoise = {kind: distill(copy.deepcopy(student), teacher, DDPMScheduler(prediction_type=kind), zeros, cfg)[1][0]["denoise"]
               for kind in ("epsilon", "v_prediction")}
    assert denoise["epsilon"] == pytest.approx(1.0, abs=0.05)
    assert denoise["v_prediction"] < 0.6 * denoise["epsilon"]
