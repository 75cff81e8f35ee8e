"""Structured pruning of diffusion UNets to a MACs target.

torch-pruning's DepGraph finds the coupled channels (residual adds, skip concatenations, GroupNorm
groups, GEGLU's ``chunk(2)``); we choose how many to remove. One pruning ratio does not map to one
MACs ratio: GroupNorm groups are pruned evenly and channel rounding quantises the result. So the ratio
is found by bisection on the measured MACs.

The dependency graph is traced once and every importance score computed once; a trial turns a ratio
into a *plan* (which indices of which layer dimension to remove, in the unpruned model's coordinates),
applies it to a copy of the model whose weights live on the meta device and counts that copy's MACs
from shapes alone. Only the chosen plan is applied to real weights. On the full SD1.5 UNet this makes
a trial about a second instead of a deep copy, a trace, a prune and a forward pass.

MACs on meta tensors are checked against :func:`deploykit.models.ops.measure_macs` on the real model
once, before the search (both count attention from its shapes, so they agree unless a layer's cost
depends on values); if they differ, the trials run on real weights.

Attention (diffusers ``Attention``: to_q / to_k / to_v, scaled-dot-product attention, to_out.0) is
pruned here rather than by torch-pruning's channel ranking, in one of three ways (``PruneConfig.attention``):

- ``heads`` (default): whole heads are removed from q, k, v and to_out.0's input together. Chosen
  because it is exact and keeps kernels fast: the remaining heads compute what they computed before
  (same head width, same softmax scale, which diffusers' SDPA path derives from the head width), and
  fused attention kernels (FlashAttention, TensorRT's fMHA) are specialised on head widths such as 40,
  64, 80, 160 that head pruning keeps. torch-pruning's own ``num_heads``/``prune_num_heads`` rounds
  the removed heads up (one head of eight goes at any ratio above 0), cannot round the remaining
  width to a multiple, and mutates the pruner's state on every call, so we rank heads ourselves on the
  same dependency group. Single-head attention (pixel UNets) cannot lose a head: its width is pruned
  as channels, as before.
- ``head_dims``: every head keeps its count and loses the same number of its own least important
  dims. The softmax scale 1/sqrt(head_dim) would change with the width; we fold sqrt(new/old) into
  to_q so that the kept logits are exactly the original ones minus the removed dims' terms.
- ``dense``: q/k/v stay as they are.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatch

import torch
import torch_pruning as tp
from torch import nn

from deploykit.models.inputs import unet_of
from deploykit.models.ops import Macs, count_params, measure_macs
from deploykit.models.sync import sync_diffusers_attributes
from deploykit.models.wrappers import TensorOutput
from deploykit.prune.importance import get_criterion

# Layers whose output channels stay dense unless told otherwise: conv_out (its outputs are the
# model's output) and the embeddings every block reads. conv_in is not here: for pixel UNets its input
# is the data and its outputs are the first level's width, where most of the MACs are.
DEFAULT_IGNORED = ("conv_out", "time_embedding.*", "class_embedding.*")
# Stable Diffusion UNets (UNet2DConditionModel) also keep conv_in and SDXL's text-time embedding
# (add_embedding, summed into the time embedding) dense.
SD_IGNORED = ("conv_in", "conv_out", "time_embedding.*", "class_embedding.*", "add_embedding.*")

ATTENTION_MODES = ("heads", "head_dims", "dense")


def default_ignored(model: nn.Module) -> tuple[str, ...]:
    """The layers kept dense by default: :data:`SD_IGNORED` for UNet2DConditionModel, else :data:`DEFAULT_IGNORED`."""
    from diffusers import UNet2DConditionModel

    return SD_IGNORED if isinstance(unet_of(model), UNet2DConditionModel) else DEFAULT_IGNORED


@dataclass
class PruneConfig:
    criterion: str = "magnitude"
    macs_target: float = 0.5          # student MACs / teacher MACs, upper bound
    round_to: int | None = 8          # keep channel counts (and attention widths) multiples of this
    ignored: Sequence[str] | None = None  # fnmatch patterns of module names; None: default_ignored(model)
    max_layer_ratio: float = 0.9      # never remove more than this share of one layer
    search_steps: int = 10
    tolerance: float = 0.02           # stop once within this of the target
    seed: int = 0
    attention: str = "heads"          # "heads", "head_dims" or "dense" (see the module docstring)


@dataclass
class PruneResult:
    macs_before: int                # MACs per call, attention included (models.ops.measure_macs)
    macs_after: int
    macs_dense_layers_before: int   # convolutions and linear layers only, as published tables count
    macs_dense_layers_after: int
    params_before: int
    params_after: int
    pruning_ratio: float
    trials: list[dict] = field(default_factory=list)
    criterion_seconds: float = 0.0  # time the criterion's gradient loop or calibration took
    search_seconds: float = 0.0     # trace, importance and search
    calibration: dict = field(default_factory=dict)  # what a calibrated criterion measured (block-removal: its ranking)

    @property
    def macs_ratio(self) -> float:
        return self.macs_after / self.macs_before


def _ignored_modules(model: nn.Module, patterns: Sequence[str]) -> list[nn.Module]:
    return [m for name, m in model.named_modules()
            if name and any(fnmatch(name, p) for p in patterns) and isinstance(m, (nn.Conv2d, nn.Linear))]


def _group_step(model: nn.Module, round_to: int | None) -> int:
    k = round_to or 1
    for m in model.modules():
        if isinstance(m, nn.GroupNorm):
            k = math.lcm(k, m.num_groups)
    return k


def _channel_groups(model: nn.Module, round_to: int | None) -> dict[nn.Module, int]:
    """Output channel groups that keep every width a multiple of ``round_to``.

    torch-pruning removes the same channels from each of a layer's channel groups, which is what
    keeps GroupNorm groups equal. Declaring ``lcm(round_to, GroupNorm groups)`` groups on every layer
    makes widths multiples of both. A layer whose width is not a multiple of that step gets one group
    per channel, which keeps it dense (torch-pruning would have to remove all of it): rounding is a
    promise. (torch-pruning's own ``round_to`` mixes per-group and total counts under GroupNorm and
    then removes far more than asked.)
    GEGLU's projection (``[hidden, gate]``, split by ``chunk(2)``) gets twice as many groups, so that
    each half is a multiple; an even group count also removes the same offsets from both halves
    (torch-pruning maps an index in one half to the other too).
    """
    from diffusers.models.activations import GEGLU

    k = _group_step(model, round_to)
    geglu = {m.proj for m in model.modules() if isinstance(m, GEGLU)}
    groups: dict[nn.Module, int] = {}
    for m in model.modules():
        width = m.out_channels if isinstance(m, nn.Conv2d) else m.out_features if isinstance(m, nn.Linear) else 0
        step = 2 * k if m in geglu else k
        if width and step > 1:
            groups[m] = step if width % step == 0 else width
    return groups


def _attention_modules(model: nn.Module) -> dict[str, nn.Module]:
    from diffusers.models.attention_processor import Attention

    return {name: m for name, m in model.named_modules() if isinstance(m, Attention)}


def _plain_attention(attn: nn.Module) -> bool:
    """q, k, v and to_out.0 form one group and nothing else reads the head layout."""
    return (isinstance(getattr(attn, "to_k", None), nn.Linear) and isinstance(getattr(attn, "to_v", None), nn.Linear)
            and getattr(attn, "norm_q", None) is None and getattr(attn, "norm_k", None) is None
            and getattr(attn, "add_k_proj", None) is None and attn.to_q.out_features == attn.to_k.out_features
            == attn.to_v.out_features and attn.to_q.out_features % attn.heads == 0)


def _keep_count(total: int, ratio: float, max_ratio: float, step: int) -> int:
    """Units kept out of ``total`` at ``ratio``: a multiple of ``step`` (all of them if none fits)."""
    if step > total or total % step:
        return total
    keep = math.floor(total * (1 - min(ratio, max_ratio)) + 1e-9) // step * step  # rounded down, as channels are
    least = math.ceil(max(math.ceil(total * (1 - max_ratio) - 1e-9), 1) / step) * step
    return min(max(keep, least), total)


# A plan: for each (layer name, pruning function, pruning dim), the indices to remove from that
# dimension of the *unpruned* layer.
Plan = dict[tuple[str, Callable, int], set[int]]


@dataclass
class _Planned:
    plan: Plan
    heads: dict[str, int]  # attention module name -> heads after pruning


class _CachedImportance:
    """The criterion's scores per dependency group, computed once: the model does not change between trials."""

    def __init__(self, importance: Callable):
        self.importance = importance
        self.cache: dict[tuple, torch.Tensor | None] = {}

    def __call__(self, group) -> torch.Tensor | None:
        dep, idxs = group[0]
        key = (dep.target.module, dep.handler, len(idxs))
        if key not in self.cache:
            self.cache[key] = self.importance(group)
        return self.cache[key]


class _Planner:
    """Traces the model once and turns pruning ratios into plans."""

    def __init__(self, model: nn.Module, example_inputs: Sequence[torch.Tensor], cfg: PruneConfig, ignored: Sequence[str],
                 importance: tp.importance.Importance | None = None):
        if cfg.attention not in ATTENTION_MODES:
            raise ValueError(f"attention must be one of {', '.join(ATTENTION_MODES)}, got {cfg.attention!r}")
        self.cfg = cfg
        self.names = {m: n for n, m in model.named_modules()}
        ignored_modules = _ignored_modules(model, ignored)
        ignored_set = set(ignored_modules)
        # attention handled here (whole heads or head dims), or kept dense; its q/k/v are hidden from
        # torch-pruning's channel ranking (which would cut heads unevenly)
        self.attention: dict[str, nn.Module] = {}
        hidden: list[nn.Module] = []
        for name, attn in _attention_modules(model).items():
            qkv = [getattr(attn, p, None) for p in ("to_q", "to_k", "to_v")]
            if not _plain_attention(attn) or ignored_set & set(qkv) or cfg.attention == "dense":
                hidden += [m for m in qkv if isinstance(m, nn.Linear)]
            elif cfg.attention == "head_dims" or attn.heads > 1:
                self.attention[name] = attn
                hidden += qkv
        self.importance = _CachedImportance(importance if importance is not None else get_criterion(cfg.criterion).factory())
        torch.manual_seed(cfg.seed)  # the random criterion draws from the global generator
        self.pruner = tp.pruner.BasePruner(
            TensorOutput(model),
            example_inputs=tuple(example_inputs),
            importance=self.importance,
            pruning_ratio=0.0,
            max_pruning_ratio=cfg.max_layer_ratio,
            ignored_layers=ignored_modules + hidden,
            out_channel_groups=_channel_groups(model, cfg.round_to),
            global_pruning=False,
        )
        self.DG = self.pruner.DG
        self.modules = dict(model.named_modules())
        self._head_scores: dict[str, tuple[torch.Tensor, _GroupMap]] = {}
        self._record_cache: list | None = None

    def _add(self, plan: Plan, group) -> None:
        """Add a torch-pruning group (with the indices to remove) to ``plan``."""
        for key, idxs, _ in self._items(group):
            if idxs:
                plan.setdefault(key, set()).update(idxs)

    def _items(self, group):
        """(plan key, plain indices, root indices) of each layer dimension in a group."""
        for dep, idxs in group:
            target = dep.target.module
            if dep.target.type == tp.ops.OPTYPE.PARAMETER:
                raise NotImplementedError("pruning unwrapped nn.Parameters is not supported")
            name = self.names.get(target) if isinstance(target, nn.Module) else None
            if name is None:  # torch-pruning's nodes for functional ops, the wrapper
                continue
            yield ((name, dep.handler, dep.target.pruning_dim), [int(i) for i in tp._helpers.to_plain_idxs(idxs)],
                   [int(i) for i in tp._helpers.to_root_idxs(idxs)])

    def _group_map(self, group) -> _GroupMap:
        """A map from root indices to every layer dimension's indices, for a full group (every channel of its root).

        torch-pruning pairs each index with the root index it follows from (``_HybridIndex``), but
        through a concatenation the pair carries the concatenated position instead. So each layer's
        map is checked against torch-pruning's own propagation of a random half of the root's
        channels: the recorded pairs, else position in the list, else the group is propagated by
        torch-pruning on every trial (slow, but what torch-pruning itself does).
        """
        root_dep = group[0].dep
        root, fn = root_dep.target.module, root_dep.handler
        width = len(group[0].idxs)
        probe = torch.randperm(width, generator=torch.Generator().manual_seed(width))[: max(width // 2, 1)].sort()[0]
        expected = {key: set(idxs) for key, idxs, _ in self._items(self.DG.get_pruning_group(root, fn, probe.tolist()))}
        entries = []
        for key, idxs, roots in self._items(group):
            module, handler = self.modules[key[0]], key[1]
            if self.DG.is_out_channel_pruning_fn(handler):
                channels = self.DG.get_out_channels(module)
            elif self.DG.is_in_channel_pruning_fn(handler):
                channels = self.DG.get_in_channels(module)
            else:
                channels = None
            idxs_t = torch.tensor(idxs, dtype=torch.long)
            candidates = [torch.tensor(roots, dtype=torch.long)]
            if len(idxs) == width:
                candidates.append(torch.arange(width))
            for roots_t in candidates:
                if set(idxs_t[torch.isin(roots_t, probe)].tolist()) == expected.get(key, set()):
                    entries.append((key, idxs_t, roots_t, channels))
                    break
            else:
                return _GroupMap([], fallback=(self.DG, root, fn, self))
        return _GroupMap(entries)

    def _records(self) -> list[tuple[_GroupMap, int, torch.Tensor]]:
        """Every prunable group once: its map, channel groups and per-position importance.

        This is phase 1 of torch-pruning's ``BasePruner._prune`` (local pruning, no head pruning),
        run once; :meth:`plan` is its phase 2 for one ratio.
        """
        if self._record_cache is None:
            p, records = self.pruner, []
            for group in self.DG.get_all_groups(ignored_layers=p.ignored_layers, root_module_types=p.root_module_types):
                if not p._check_pruning_ratio(group):
                    continue
                ch_groups = p._get_channel_groups(group)
                imp = p.estimate_importance(group)
                if imp is None:
                    continue
                dim_imp = imp.view(ch_groups, -1).mean(dim=0).cpu() if ch_groups > 1 else imp.cpu()
                records.append((self._group_map(group), ch_groups, dim_imp))
            self._record_cache = records
        return self._record_cache

    def _scores(self, name: str, attn: nn.Module) -> tuple[torch.Tensor, _GroupMap]:
        """Importance of each of q's output channels, over the group q, k, v, to_out.0 (in)."""
        if name not in self._head_scores:
            group = self.DG.get_pruning_group(attn.to_q, tp.prune_linear_out_channels, list(range(attn.to_q.out_features)))
            imp = self.importance.importance(group)
            if imp is None:  # criterion without scores for this group (e.g. no gradients reached it)
                imp = torch.zeros(attn.to_q.out_features)
            self._head_scores[name] = imp.detach().float().cpu(), self._group_map(group)
        return self._head_scores[name]

    def breakpoints(self) -> list[float]:
        """Ratios where some layer's or attention's kept count may change.

        torch-pruning keeps ``int(n * (1 - ratio))`` of a group of ``n`` units, and so does
        :func:`_keep_count` before rounding: counts change only at ``1 - j / n``.
        """
        sizes = {len(dim_imp) for _, _, dim_imp in self._records()}
        for attn in self.attention.values():
            sizes.add(attn.heads if self.cfg.attention == "heads" else attn.to_q.out_features // attn.heads)
        return sorted({1 - j / n for n in sizes if n > 0 for j in range(n + 1)})

    def plan_with_torch_pruning(self, ratio: float) -> Plan:
        """The channel part of :meth:`plan` as torch-pruning's own pruner computes it (slow: for tests)."""
        plan: Plan = {}
        self.pruner.per_step_pruning_ratio = [0.0, ratio]
        self.pruner.current_step = 0
        for group in self.pruner.step(interactive=True):
            self._add(plan, group)
        return plan

    def plan(self, ratio: float) -> _Planned:
        plan: Plan = {}
        heads = {name: attn.heads for name, attn in self.attention.items()}
        if ratio <= 0:
            return _Planned(plan, heads)
        # Groups are laid out in the unpruned model's coordinates because nothing is pruned in between;
        # they touch disjoint (layer, dim) pairs apart from concatenations, whose parts are offsets
        # into the same unpruned dim: so the union per (layer, dim) is the whole plan.
        target = min(ratio, self.cfg.max_layer_ratio)
        for gmap, ch_groups, dim_imp in self._records():
            n = len(dim_imp)
            n_pruned = n - int(n * (1 - target))
            if n_pruned <= 0:
                continue
            chosen = torch.topk(dim_imp, k=n_pruned, largest=False)[1]
            if ch_groups > 1:
                chosen = torch.cat([chosen + g * n for g in range(ch_groups)])
            gmap.add_to(plan, torch.unique(chosen))
        step = self.cfg.round_to or 1
        for name, attn in self.attention.items():
            width, h = attn.to_q.out_features, attn.heads
            head_dim = width // h
            scores, gmap = self._scores(name, attn)
            scores = scores.view(h, head_dim)
            if self.cfg.attention == "heads":
                keep = _keep_count(h, ratio, self.cfg.max_layer_ratio, step // math.gcd(step, head_dim))
                removed = torch.argsort(scores.mean(1), stable=True)[: h - keep]
                idxs = (removed[:, None] * head_dim + torch.arange(head_dim)).flatten()
                heads[name] = keep
            else:
                keep = _keep_count(head_dim, ratio, self.cfg.max_layer_ratio, step // math.gcd(step, h))
                order = torch.argsort(scores, dim=1, stable=True)[:, : head_dim - keep]
                idxs = (order + torch.arange(h)[:, None] * head_dim).flatten()
            if len(idxs):
                gmap.add_to(plan, torch.unique(idxs))
        return _Planned(plan, heads)


class _GroupMap:
    """Root indices to each layer dimension's indices for one dependency group."""

    def __init__(self, entries: list[tuple[tuple, torch.Tensor, torch.Tensor, int | None]], fallback: tuple | None = None):
        self.entries = entries
        self.fallback = fallback  # (DG, root module, pruning function, planner): let torch-pruning propagate

    def add_to(self, plan: Plan, root_idxs: torch.Tensor) -> None:
        if self.fallback is not None:
            dg, root, fn, planner = self.fallback
            group = dg.get_pruning_group(root, fn, root_idxs.tolist())
            if dg.check_pruning_group(group):
                planner._add(plan, group)
            return
        selected = []
        for key, idxs, roots, channels in self.entries:
            chosen = set(idxs[torch.isin(roots, root_idxs)].tolist())
            if channels is not None and channels <= len(chosen):
                return  # as torch-pruning's check_pruning_group: never remove a whole layer
            selected.append((key, chosen))
        for key, chosen in selected:
            if chosen:
                plan.setdefault(key, set()).update(chosen)


def _structure_copy(model: nn.Module, tensor_map: Callable[[torch.Tensor], torch.Tensor]) -> nn.Module:
    """A copy of ``model``'s modules whose parameters and buffers are ``tensor_map`` of the originals."""
    memo: dict[int, object] = {}
    for p in model.parameters():
        memo[id(p)] = tensor_map(p)
    for b in model.buffers():
        memo[id(b)] = tensor_map(b)
    return copy.deepcopy(model, memo)


def _on_meta(t: torch.Tensor) -> torch.Tensor:
    m = torch.empty_like(t, device="meta")
    return nn.Parameter(m, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else m


def _apply(model: nn.Module, planned: _Planned) -> None:
    modules = dict(model.named_modules())
    for (name, handler, dim), idxs in planned.plan.items():
        handler.__self__.pruning_dim = dim  # as torch-pruning's Dependency.__call__ does
        handler(modules[name], sorted(idxs))
    sync_diffusers_attributes(model, heads=planned.heads)


def _fold_attention_scale(pruned: nn.Module, head_dims: dict[str, int]) -> None:
    """Keep the softmax scale of attention whose head width changed: q *= sqrt(new / old)."""
    for name, attn in _attention_modules(pruned).items():
        old, new = head_dims.get(name), attn.to_q.out_features // attn.heads
        if old is None or old == new or not getattr(attn, "scale_qk", True):
            continue
        factor = math.sqrt(new / old)
        with torch.no_grad():
            attn.to_q.weight.mul_(factor)
            if attn.to_q.bias is not None:
                attn.to_q.bias.mul_(factor)


class _MacsCounter:
    """MACs of a planned model, counted as ``measure_macs`` counts the real one, on meta weights where that agrees."""

    def __init__(self, source: nn.Module, example_inputs: Sequence[torch.Tensor]):
        self.source, self.inputs = source, tuple(example_inputs)
        self.meta_inputs = tuple(t.to("meta") for t in example_inputs)
        self.reference = measure_macs(source, example_inputs)
        self.cache: dict[tuple, Macs] = {}  # plans that differ only in which indices go cost the same
        self.on_meta = True  # what _count reads: try the meta skeleton first
        self.on_meta = self._count(_Planned({}, {})) == self.reference

    def __call__(self, planned: _Planned) -> Macs:
        key = (tuple(sorted((name, getattr(fn, "__qualname__", str(fn)), dim, len(idxs))
                            for (name, fn, dim), idxs in planned.plan.items())),
               tuple(sorted(planned.heads.items())))
        if key not in self.cache:
            self.cache[key] = self._count(planned)
        return self.cache[key]

    def _count(self, planned: _Planned) -> Macs:
        if not self.on_meta:
            return measure_macs(_materialise(self.source, planned), self.inputs)
        skeleton = _structure_copy(self.source, _on_meta)
        _apply(skeleton, planned)
        return measure_macs(skeleton, self.meta_inputs)


def _materialise(model: nn.Module, planned: _Planned) -> nn.Module:
    """The pruned model with its own weights; ``model`` is left as it was."""
    pruned = _structure_copy(model, lambda t: t)  # shares the unpruned tensors until they are cloned below
    _apply(pruned, planned)
    originals = {id(t) for t in list(model.parameters()) + list(model.buffers())}
    for module in pruned.modules():
        for key, p in module._parameters.items():
            if p is not None:
                fresh = p.detach().clone() if id(p) in originals else p.detach()
                module._parameters[key] = nn.Parameter(fresh, requires_grad=p.requires_grad)
        for key, b in module._buffers.items():
            if b is not None and id(b) in originals:
                module._buffers[key] = b.clone()
    _fold_attention_scale(pruned, {n: a.to_q.out_features // a.heads for n, a in _attention_modules(model).items()})
    return pruned


def prune_to_macs(
    model: nn.Module,
    example_inputs: Sequence[torch.Tensor],
    config: PruneConfig,
    forward_loop: Callable[[nn.Module], None] | None = None,
    on_trial: Callable[[dict], None] | None = None,
    calibration_forward: Callable[[nn.Module], torch.Tensor] | None = None,
) -> tuple[nn.Module, PruneResult]:
    """Prune a copy of ``model`` to at most ``config.macs_target`` of its MACs.

    ``forward_loop(model)`` runs the caller's data through the model and calls ``backward()``; it is
    needed by gradient criteria (``taylor``) and ignored by the others. ``calibration_forward(model)``
    returns the model's output on the caller's fixed calibration inputs; it is needed by calibrated
    criteria (``block-removal``) and ignored by the others. ``model`` is not modified (gradient
    criteria work on a copy; the others read ``model`` and copy only the pruned result).
    """
    criterion = get_criterion(config.criterion)
    if not 0 < config.macs_target <= 1:
        raise ValueError(f"macs_target must be in (0, 1], got {config.macs_target}")
    ignored = default_ignored(model) if config.ignored is None else tuple(config.ignored)
    was_training = model.training
    importance = criterion.factory()
    calibration: dict = {}
    criterion_seconds = 0.0
    if criterion.needs_gradients:
        if forward_loop is None:
            raise ValueError(f"criterion {criterion.name!r} needs gradients: pass a forward_loop")
        model = copy.deepcopy(model).eval()
        model.zero_grad(set_to_none=True)
        started = time.perf_counter()
        with torch.enable_grad():
            forward_loop(model)
        criterion_seconds += time.perf_counter() - started
    if criterion.needs_calibration:
        if calibration_forward is None:
            raise ValueError(f"criterion {criterion.name!r} needs calibration: pass a calibration_forward")
        started = time.perf_counter()
        calibration = importance.calibrate(model, calibration_forward)  # leaves the model as it was
        criterion_seconds += time.perf_counter() - started
    source = model
    started = time.perf_counter()
    try:
        planner = _Planner(source, example_inputs, config, ignored, importance)
        trial_macs = _MacsCounter(source, example_inputs)
        before = trial_macs.reference
        params_before = count_params(source)

        best: tuple[float, _Planned, Macs] | None = None
        lo, hi = 0.0, config.max_layer_ratio
        trials: list[dict] = []
        for _ in range(config.search_steps):
            ratio = (lo + hi) / 2
            planned = planner.plan(ratio)
            macs = trial_macs(planned)
            macs_ratio = macs.total / before.total
            trial = {"pruning_ratio": round(ratio, 5), "macs_ratio": round(macs_ratio, 5)}
            trials.append(trial)
            if on_trial:
                on_trial(trial)
            if macs_ratio <= config.macs_target:
                if best is None or ratio < best[0]:
                    best = (ratio, planned, macs)
                hi = ratio
                if config.macs_target - macs_ratio <= config.tolerance:
                    break
            else:
                lo = ratio
            # a failing lo and a passing hi with at most one step of the MACs curve between them:
            # every further trial would find one of the two plans again
            if best is not None and lo > 0 and sum(lo - 1e-9 <= b <= hi + 1e-9 for b in planner.breakpoints()) <= 1:
                break
        if best is None:
            raise ValueError(f"could not reach {config.macs_target:.0%} of the MACs (closest "
                             f"{min(t['macs_ratio'] for t in trials):.1%}); raise macs_target, lower round_to "
                             "or ignore fewer layers")
        ratio, planned, _ = best
        del planner
        pruned = _materialise(source, planned)
    finally:
        if not criterion.needs_gradients:
            source.train(was_training)  # torch-pruning's tracer switches the model to eval
    search_seconds = time.perf_counter() - started
    pruned.zero_grad(set_to_none=True)
    pruned.eval()
    after = best[2]  # counted as measure_macs counts (checked against it in _MacsCounter)
    return pruned, PruneResult(before.total, after.total, before.dense_layers, after.dense_layers,
                               params_before, count_params(pruned), ratio, trials,
                               criterion_seconds, search_seconds, calibration)
