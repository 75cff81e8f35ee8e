"""Pruning Stable Diffusion UNets (UNet2DConditionModel): tiny SD1.5- and SDXL-shaped topologies.

Kept channels are recovered by value: before pruning every 1-D parameter gets distinct random values,
so a pruned bias or norm weight says which of the original channels it kept. The numerical checks
compare a pruned block with the original block whose removed channels are zeroed ("pruning is
masking"): they fail if GEGLU halves or attention heads are paired wrongly, or the softmax scale moved.
"""

import copy
import json

import pytest
import torch
from torch import nn

from deploykit.models import count_macs, describe, load_model, save_model
from deploykit.models.inputs import example_unet_inputs
from deploykit.models.topologies import build_unet
from deploykit.models.wrappers import TensorOutput
from deploykit.prune import SD_IGNORED, PruneConfig, default_ignored, prune_to_macs
from deploykit.prune.core import DEFAULT_IGNORED

SIZE = 8  # latent side: small and fast; attention still sees 64 tokens


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # tiny models: threads buy nothing, and on a busy 2-core machine they cost several times over
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _distinct(model: nn.Module) -> nn.Module:
    gen = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1 + (1.0 if p.abs().mean() > 0.5 else 0.0))
    return model


def _inputs(model, batch=1, seed=0):
    return example_unet_inputs(model, batch, SIZE, seed=seed)


_CACHE: dict = {}
# round_to 16 is finer than tiny-sdxl's GroupNorm (8 groups): a width that is a multiple of 8 but not 16 is a bug
ROUND_TO = {"tiny-sd": 8, "tiny-sdxl": 16}


def _pruned(name: str, **cfg):
    key = (name, tuple(sorted(cfg.items())))
    if key not in _CACHE:
        dense = _distinct(build_unet(name))
        cfg = {"macs_target": 0.5, "round_to": ROUND_TO[name], "tolerance": 0.2, **cfg}  # the first trial under 50% will do
        pruned, result = prune_to_macs(dense, _inputs(dense), PruneConfig(**cfg))
        _CACHE[key] = dense, pruned, result
    return _CACHE[key]


def _kept(original: torch.Tensor, pruned: torch.Tensor) -> torch.Tensor:
    """Which entries of a 1-D ``original`` the ``pruned`` one kept, in order."""
    match = (pruned[:, None] == original[None, :]).nonzero()
    assert match.shape[0] == pruned.numel() and (match[:, 0] == torch.arange(pruned.numel())).all()
    return match[:, 1]


def _kept_rows(original: torch.Tensor, pruned: torch.Tensor, cols: torch.Tensor | None) -> torch.Tensor:
    w = original if cols is None else original[:, cols]
    match = (pruned[:, None, :] == w[None, :, :]).all(-1).nonzero()
    assert match.shape[0] == pruned.shape[0], "a pruned row is not a row of the original"
    return match[:, 1]


def _modules(model):
    return dict(model.named_modules())


def _attentions(model):
    from diffusers.models.attention_processor import Attention

    return {n: m for n, m in model.named_modules() if isinstance(m, Attention)}


@pytest.mark.parametrize("name", ["tiny-sd", "tiny-sdxl"])
def test_pruned_to_half_the_macs_runs_with_the_same_output_shape(name):
    dense, pruned, result = _pruned(name)
    assert result.macs_ratio <= 0.5
    assert result.macs_after == count_macs(pruned, _inputs(dense))
    assert result.macs_before == count_macs(dense, _inputs(dense))
    assert result.params_after < result.params_before
    x = _inputs(dense, batch=2, seed=1)
    with torch.no_grad():
        out, ref = TensorOutput(pruned)(*x), TensorOutput(dense)(*x)
    assert out.shape == ref.shape and torch.isfinite(out).all()


@pytest.mark.parametrize("name", ["tiny-sd", "tiny-sdxl"])
def test_heads_stay_consistent_and_cross_attention_keeps_its_inputs(name):
    dense, pruned, _ = _pruned(name)
    dense_attn = _attentions(dense)
    fewer_heads = 0
    for n, a in _attentions(pruned).items():
        d = dense_attn[n]
        head_dim = d.inner_dim // d.heads
        assert a.to_q.out_features == a.to_k.out_features == a.to_v.out_features == a.to_out[0].in_features
        assert a.heads * head_dim == a.to_q.out_features == a.inner_dim == a.inner_kv_dim, n  # whole heads went
        assert a.scale == pytest.approx(head_dim ** -0.5)
        fewer_heads += a.heads < d.heads
        if d.is_cross_attention:
            assert a.to_k.in_features == a.to_v.in_features == d.to_k.in_features, n
        else:
            assert a.to_k.in_features == a.to_q.in_features == a.query_dim, n
    assert fewer_heads > 0, "no attention lost a head"


@pytest.mark.parametrize("name", ["tiny-sd", "tiny-sdxl"])
def test_ignored_layers_keep_their_shapes(name):
    dense, pruned, _ = _pruned(name)
    assert default_ignored(dense) == SD_IGNORED and default_ignored(build_unet(name)) != DEFAULT_IGNORED
    d, p = _modules(dense), _modules(pruned)
    kept = ["conv_in", "conv_out", "time_embedding.linear_1", "time_embedding.linear_2"]
    if name == "tiny-sdxl":
        kept += ["add_embedding.linear_1", "add_embedding.linear_2"]
    for n in kept:  # "ignored" keeps a layer's outputs; conv_out's inputs may shrink
        assert p[n].weight.shape[0] == d[n].weight.shape[0], n
    for n in kept[:1] + kept[2:]:
        assert p[n].weight.shape == d[n].weight.shape, n
    assert any(p[n].weight.shape != m.weight.shape for n, m in d.items() if isinstance(m, nn.Conv2d))


def _masked_vs_pruned_ff(dense, pruned, name):
    ff0, ff1 = _modules(dense)[name], _modules(pruned)[name]
    block = name.rsplit(".", 1)[0]
    norm0, norm1 = _modules(dense)[block + ".norm3"], _modules(pruned)[block + ".norm3"]
    kept_in = _kept(norm0.bias, norm1.bias)
    proj0, proj1 = ff0.net[0].proj, ff1.net[0].proj
    inner0, inner1 = proj0.out_features // 2, proj1.out_features // 2
    rows = _kept(proj0.bias, proj1.bias)
    hidden, gate = rows[:inner1], rows[inner1:]
    assert inner1 < inner0 and inner1 % 8 == 0
    assert torch.equal(gate, hidden + inner0), "GEGLU halves are no longer paired"
    kept_out = _kept(ff0.net[2].bias, ff1.net[2].bias)
    assert torch.equal(ff1.net[2].weight, ff0.net[2].weight[kept_out][:, hidden])
    # pruning == masking: the original FF with the removed inner channels zeroed
    x = torch.randn(2, 5, len(kept_in))
    x_full = torch.zeros(2, 5, proj0.in_features)
    x_full[..., kept_in] = x
    h, g = proj0(x_full).chunk(2, dim=-1)
    mask = torch.zeros(inner0)
    mask[hidden] = 1
    reference = ff0.net[2](h * torch.nn.functional.gelu(g) * mask)[..., kept_out]
    with torch.no_grad():
        torch.testing.assert_close(ff1(x), reference.detach(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["tiny-sd", "tiny-sdxl"])
def test_geglu_halves_stay_aligned(name):
    dense, pruned, _ = _pruned(name)
    ffs = [n for n, m in pruned.named_modules() if n.endswith(".ff")]
    assert ffs
    for n in ffs:
        _masked_vs_pruned_ff(dense, pruned, n)


def _masked_vs_pruned_attention(dense, pruned, name):
    a0, a1 = _modules(dense)[name], _modules(pruned)[name]
    block = name.rsplit(".", 1)[0]
    norm = ".norm1" if name.endswith("attn1") else ".norm2"
    kept_in = _kept(_modules(dense)[block + norm].bias, _modules(pruned)[block + norm].bias)
    kept_out = _kept(a0.to_out[0].bias, a1.to_out[0].bias)
    kv_cols = None if a0.is_cross_attention else kept_in
    inner = _kept_rows(a0.to_v.weight, a1.to_v.weight, kv_cols)
    assert torch.equal(_kept_rows(a0.to_k.weight, a1.to_k.weight, kv_cols), inner)
    head_dim0 = a0.inner_dim // a0.heads
    x = torch.randn(2, 6, len(kept_in))
    x_full = torch.zeros(2, 6, a0.query_dim)
    x_full[..., kept_in] = x
    context = torch.randn(2, 7, a0.to_k.in_features) if a0.is_cross_attention else None
    masked = copy.deepcopy(a0)
    removed = torch.ones(a0.inner_dim, dtype=torch.bool)
    removed[inner] = False
    with torch.no_grad():
        for lin in (masked.to_q, masked.to_k, masked.to_v):
            lin.weight[removed] = 0
        reference = masked(x_full, encoder_hidden_states=context)[..., kept_out]
        out = a1(x, encoder_hidden_states=context)
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)
    return inner, head_dim0


@pytest.mark.parametrize("name", ["tiny-sd", "tiny-sdxl"])
def test_removed_heads_are_whole_heads_and_the_rest_compute_as_before(name):
    dense, pruned, _ = _pruned(name)
    for n, a in _attentions(pruned).items():
        inner, head_dim = _masked_vs_pruned_attention(dense, pruned, n)
        heads = inner.view(-1, head_dim)  # whole heads, in order
        assert torch.equal(heads - heads[:, :1], torch.arange(head_dim).expand_as(heads)), n
        assert (heads[:, 0] % head_dim == 0).all(), n


def test_head_dim_pruning_keeps_heads_and_the_softmax_scale():
    dense, pruned, result = _pruned("tiny-sd", attention="head_dims", round_to=16)
    assert result.macs_ratio <= 0.5
    narrower = 0
    for n, a in _attentions(pruned).items():
        d = _attentions(dense)[n]
        assert a.heads == d.heads and a.to_q.out_features % 16 == 0
        narrower += a.to_q.out_features < d.to_q.out_features
        inner, head_dim = _masked_vs_pruned_attention(dense, pruned, n)
        per_head = torch.bincount(inner // head_dim, minlength=d.heads)
        assert (per_head == a.to_q.out_features // a.heads).all(), n  # the same dims count in every head
        assert a.scale == pytest.approx((a.inner_dim // a.heads) ** -0.5)
    assert narrower


@pytest.mark.parametrize("name,attention", [("tiny-sd", "head_dims"), ("tiny-sdxl", "heads")])
def test_classic_attention_processor_agrees_with_sdpa(name, attention):
    # diffusers' AttnProcessor splits heads with attn.heads and scales with attn.scale (SDPA derives
    # its scale from the tensors): both must be synced
    from diffusers.models.attention_processor import AttnProcessor

    _, pruned, _ = _pruned(name, **({"attention": attention, "round_to": 16} if attention != "heads" else {}))
    classic = copy.deepcopy(pruned)
    classic.set_attn_processor(AttnProcessor())
    x = _inputs(pruned, batch=2, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(TensorOutput(classic)(*x), TensorOutput(pruned)(*x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name,round_to,attention", [("tiny-sdxl", 16, "heads"), ("tiny-sd", 16, "head_dims")])
def test_pruned_widths_are_multiples_of_round_to(name, round_to, attention):
    dense, pruned, result = _pruned(name, **({"attention": attention, "round_to": round_to} if attention != "heads" else {}))
    assert result.macs_ratio <= 0.5
    d = _modules(dense)
    shrunk = 0
    for n, m in pruned.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            width = m.out_channels if isinstance(m, nn.Conv2d) else m.out_features
            was = d[n].out_channels if isinstance(m, nn.Conv2d) else d[n].out_features
            shrunk += width < was
            if width != was:
                step = 2 * round_to if n.endswith("ff.net.0.proj") else round_to
                assert width % step == 0, (n, width)
        if isinstance(m, nn.GroupNorm):
            assert m.num_channels % m.num_groups == 0, n
    for n, a in _attentions(pruned).items():
        assert a.inner_dim % round_to == 0, n
    assert shrunk > 10


def test_nothing_pruned_keeps_the_outputs_identical():
    # a target the dense model meets already: the search's first trial prunes, so compare the chosen
    # plan at ratio 0 through the internal planner (tracing, plan application and sync, nothing removed)
    from deploykit.prune.core import _materialise, _Planner

    dense = build_unet("tiny-sdxl")
    x = _inputs(dense)
    planner = _Planner(dense, x, PruneConfig(), SD_IGNORED)
    planned = planner.plan(0.0)
    assert not planned.plan
    same = _materialise(dense, planned)
    with torch.no_grad():
        torch.testing.assert_close(TensorOutput(same)(*x), TensorOutput(dense)(*x), rtol=0, atol=0)


@pytest.mark.parametrize("name", ["tiny-sd", "tiny-sdxl"])
def test_save_and_load_keep_head_counts_and_outputs(name, tmp_path):
    dense, pruned, _ = _pruned(name)
    save_model(pruned, tmp_path)
    arch = json.loads((tmp_path / "architecture.json").read_text())
    assert arch["format_version"] == 2
    assert {n: s["heads"] for n, s in arch["attention"].items()} == {n: a.heads for n, a in _attentions(pruned).items()}
    rebuilt = load_model(tmp_path)
    assert describe(rebuilt) == describe(pruned)
    assert {n: a.heads for n, a in _attentions(rebuilt).items()} == {n: a.heads for n, a in _attentions(pruned).items()}
    x = _inputs(dense, batch=2, seed=2)
    with torch.no_grad():
        torch.testing.assert_close(TensorOutput(rebuilt)(*x), TensorOutput(pruned)(*x), rtol=0, atol=0)


def test_head_counts_come_from_the_file_and_format_1_still_loads(tmp_path):
    # a width of 16 is 2 heads of 8 or 1 of 16: only the recorded count can say which
    dense, pruned, _ = _pruned("tiny-sd")
    save_model(pruned, tmp_path)
    arch = json.loads((tmp_path / "architecture.json").read_text())
    arch["attention"] = {n: {"heads": 1} for n in arch["attention"]}
    (tmp_path / "architecture.json").write_text(json.dumps(arch))
    assert all(a.heads == 1 for a in _attentions(load_model(tmp_path)).values())
    dense_dir = tmp_path / "v1"
    save_model(dense, dense_dir)
    arch = json.loads((dense_dir / "architecture.json").read_text())
    arch["format_version"] = 1
    del arch["attention"]
    (dense_dir / "architecture.json").write_text(json.dumps(arch))
    x = _inputs(dense)
    with torch.no_grad():
        torch.testing.assert_close(TensorOutput(load_model(dense_dir))(*x), TensorOutput(dense)(*x), rtol=0, atol=0)


def test_head_counts_follow_round_to():
    # tiny-sd's heads: 4 of 8 channels (level 0), 4 of 16 (mid block). round_to 16 removes heads in
    # pairs at level 0; round_to 64 would need all 4 level-0 heads, so none go there.
    from deploykit.prune.core import _Planner

    dense = build_unet("tiny-sd")
    x = _inputs(dense)
    for round_to in (16, 64):
        planned = _Planner(dense, x, PruneConfig(round_to=round_to), SD_IGNORED).plan(0.3)
        for n, a in _attentions(dense).items():
            head_dim = a.inner_dim // a.heads
            assert planned.heads[n] * head_dim % round_to == 0 or planned.heads[n] == a.heads, (round_to, n)
            if head_dim == 8:
                assert planned.heads[n] == (2 if round_to == 16 else 4), (round_to, n)


@pytest.mark.parametrize("name", ["tiny-sd", "tiny-sdxl"])
def test_the_fast_plan_is_torch_prunings_own(name):
    # trials map root indices through cached dependency groups instead of re-propagating each group:
    # the channel plan must be exactly what torch-pruning's pruner yields for the same ratio
    from deploykit.prune.core import _Planner

    dense = build_unet(name)
    planner = _Planner(dense, _inputs(dense), PruneConfig(attention="dense", round_to=ROUND_TO[name]), SD_IGNORED)
    for ratio in (0.2, 0.45, 0.7):
        plan = planner.plan(ratio).plan
        assert plan and plan == planner.plan_with_torch_pruning(ratio), ratio
