"""2:4 masks through the pipeline: sparsify stage, distill (fixed and SR-STE), the ONNX check, the report."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from deploykit.distill import DistillConfig, distill
from deploykit.distill.sparse import _SparseRefinedSTE
from deploykit.errors import InputError
from deploykit.export import export_unet
from deploykit.models.inputs import example_unet_inputs
from deploykit.recipe import load_recipe
from deploykit.sparsity import SparsityConfig, check_2to4, load_masks, sparsify
from deploykit.sparsity.onnx_check import check_onnx_2to4
from tests.conftest import run_cli

SMALL = SparsityConfig(min_features=8)  # the tiny test UNet's widths are 16 and 32


def _noise_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000)


def _distill(student, teacher, masks, mode: str, steps: int = 4, lr: float = 5e-3):
    config = DistillConfig(steps=steps, lr=lr, warmup_steps=0, mask_mode=mode, sr_ste_decay=2e-4, checkpoint_every=100)
    return distill(student, teacher, _noise_scheduler(), lambda step, gen: torch.randn(8, 1, 16, 16, generator=gen),
                   config, masks=masks)


def test_fixed_masks_survive_distill(tiny_unet):
    import copy

    teacher = copy.deepcopy(tiny_unet)
    masks = sparsify(tiny_unet, SMALL)
    before = {n: tiny_unet.get_submodule(n).weight.detach().clone() for n in masks}
    chosen = {n: m.clone() for n, m in masks.items()}
    student, losses = _distill(tiny_unet, teacher, masks, "fixed")
    assert len(losses) == 4
    assert check_2to4(student, masks) == []
    assert all(torch.equal(masks[n], chosen[n]) for n in masks)  # fixed: the same masks
    for n in masks:
        w = student.get_submodule(n).weight
        assert not torch.equal(w, before[n])               # it trained
        assert (w[~masks[n]] == 0).all()                    # and the masked-out weights are still zero


def test_sr_ste_gradient_is_straight_through_plus_decay_on_masked_out_weights():
    w = torch.tensor([[4.0, -3.0, 0.5, -0.25, 1.0, 2.0, 3.0, -4.0]], requires_grad=True)
    out = _SparseRefinedSTE.apply(w, 0.1)
    assert out.tolist() == [[4.0, -3.0, 0.0, 0.0, 0.0, 0.0, 3.0, -4.0]]  # the 2 largest |w| of each 4
    out.sum().backward()
    # dense gradient everywhere (straight through), plus 0.1 * w where the mask is off
    assert torch.allclose(w.grad, torch.tensor([[1.0, 1.0, 1.05, 0.975, 1.1, 1.2, 1.0, 1.0]]))


def test_sr_ste_rechooses_masks_and_ends_2to4(tiny_unet):
    import copy

    teacher = copy.deepcopy(tiny_unet)
    masks = sparsify(tiny_unet, SMALL)
    chosen = {n: m.clone() for n, m in masks.items()}
    student, _ = _distill(tiny_unet, teacher, masks, "sr-ste", steps=6, lr=2e-2)
    assert not any(hasattr(student.get_submodule(n), "parametrizations") for n in masks)  # plain layers again
    assert set(student.state_dict()) == set(teacher.state_dict())
    assert check_2to4(student, masks) == []
    changed = sum(int((masks[n] != chosen[n]).sum()) for n in masks)
    assert changed > 0  # weights came back: the masks moved (a large lr makes that certain in a few steps)
    for n in masks:
        assert (student.get_submodule(n).weight[~masks[n]] == 0).all()


class _Mlp(nn.Module):
    """Bias-free Linear layers export as MatMul with transposed, renamed weights: the hard case for the check."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(16, 32, bias=False)
        self.b = nn.Linear(32, 8)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


@pytest.mark.parametrize("fp16", [False, True])
def test_onnx_check_finds_masked_weights_and_flags_a_planted_violation(tmp_path, tiny_unet, fp16):
    masks = sparsify(tiny_unet, SMALL)
    assert any(n.endswith(("to_q", "to_k", "to_v")) for n in masks)  # attention Linears are among them
    path = export_unet(tiny_unet, tmp_path / "ok" / "model.onnx", example_unet_inputs(tiny_unet, 2), fp16=fp16)
    weights = {n: tiny_unet.get_submodule(n).weight for n in masks}
    result = check_onnx_2to4(path, weights)
    assert result.passed and result.compliant == result.layers == len(masks), result.message()

    name = next(iter(masks))
    with torch.no_grad():
        w = tiny_unet.get_submodule(name).weight
        w[~masks[name]] = 1.0  # every masked-out weight of one layer comes back
    path = export_unet(tiny_unet, tmp_path / "bad" / "model.onnx", example_unet_inputs(tiny_unet, 2), fp16=fp16)
    result = check_onnx_2to4(path, {n: tiny_unet.get_submodule(n).weight for n in masks})
    assert not result.passed and [v["layer"] for v in result.violations] == [name]
    assert name in result.message()


def test_onnx_check_reads_transposed_matmul_weights_and_reports_missing_ones(tmp_path):
    from deploykit.export.onnx import export_module

    torch.manual_seed(0)
    model = _Mlp().eval()
    masks = sparsify(model, SparsityConfig(min_features=0))
    assert set(masks) == {"a", "b"}
    path = tmp_path / "mlp.onnx"
    export_module(model, (torch.randn(2, 16),), path, ["x"], ["y"], {"x": {0: "batch"}})
    import onnx

    names = {i.name for i in onnx.load(str(path)).graph.initializer}
    assert "a.weight" not in names  # exported as a transposed constant under another name
    weights = {n: model.get_submodule(n).weight for n in masks}
    assert check_onnx_2to4(path, weights).compliant == 2
    result = check_onnx_2to4(path, {**weights, "c": torch.ones(8, 8)})
    assert result.not_found == ["c"] and not result.passed


def test_recipe_order_and_sparsify_as_the_only_student_stage(tmp_path):
    base = "name: r\nteacher: zoo:digits-tiny\nstages:\n"
    ok = tmp_path / "ok.yaml"
    ok.write_text(base + "  - stage: sparsify\n    min_features: 8\n  - stage: export\n")
    recipe = load_recipe(ok)
    assert recipe.stage("sparsify").exclude[:2] == ["conv_in", "conv_out"]
    bad = tmp_path / "bad.yaml"
    bad.write_text(base + "  - stage: prune\n  - stage: distill\n  - stage: sparsify\n")
    with pytest.raises(InputError, match="order prune -> sparsify -> distill"):
        load_recipe(bad)
    bad.write_text(base + "  - stage: prune\n  - stage: distill\n    mask_mode: dense\n")
    with pytest.raises(InputError, match="mask_mode"):
        load_recipe(bad)


SPARSE_RECIPE = """\
name: tiny-sparse
teacher: zoo:digits-tiny
seed: 0
stages:
  - stage: prune
    macs_target: 0.6
    round_to: 4
  - stage: sparsify
    min_features: 8
  - stage: distill
    steps: 6
    batch_size: 16
    mask_mode: {mode}
  - stage: export
    fp16: true
  - stage: bench
    backends: [torch-cpu]
    batch_size: 8
    warmup: 1
    runs: 3
  - stage: eval
    num_samples: 16
    steps: 3
    grid_samples: 4
"""


@pytest.mark.parametrize("mode", ["sr-ste"])
def test_a_2to4_build_keeps_every_masked_weight_2to4_through_distill_and_export(tmp_path, zoo_env, mode):
    from deploykit.models import load_model

    recipe = tmp_path / "sparse.yaml"
    recipe.write_text(SPARSE_RECIPE.format(mode=mode))
    out = tmp_path / "art"
    proc = run_cli("build", str(recipe), "--out", str(out), env=zoo_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    sp = report["sparsity"]
    assert sp["layers"] > 0 and sp["recovery"]["mask_mode"] == mode
    assert sp["onnx"]["student"]["passed"] and sp["onnx"]["student-fp16"]["passed"]
    assert sp["onnx"]["student"]["compliant"] == sp["layers"]
    assert "pruned" in report and "psnr_vs_teacher" in report["student"]["quality"]  # the quality cost, before and after
    assert "2:4 sparsity" in (out / "report.md").read_text()
    # the artifact's student carries its masks, and its weights obey them
    masks = load_masks(out / "model")
    student = load_model(out / "model")
    assert len(masks) == sp["layers"] and check_2to4(student, masks) == []
    # and so does the ONNX graph the artifact ships (checked here independently of the export stage)
    result = check_onnx_2to4(out / "onnx" / "unet" / "model.onnx", {n: student.get_submodule(n).weight for n in masks})
    assert result.passed and result.compliant == len(masks)


def test_sparsify_with_nothing_eligible_is_bad_input_and_writes_nothing(tmp_path, zoo_env):
    recipe = tmp_path / "none.yaml"
    recipe.write_text("name: none\nteacher: zoo:digits-tiny\nstages:\n  - stage: sparsify\n")  # default min_features 256
    out = tmp_path / "art"
    proc = run_cli("build", str(recipe), "--out", str(out), env=zoo_env)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "no layer of the teacher is eligible" in proc.stderr and "Traceback" not in proc.stderr
    assert not (out / "report.json").exists() and not (out / "model").exists()
