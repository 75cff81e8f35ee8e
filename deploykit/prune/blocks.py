"""Block-removal scores in the style of LAPTOP-Diff (Layer Pruning and Normalized Distillation for
Compressing Diffusion Models, 2024).

A *removable block* is a residual unit whose output has its input's shape, so that deleting it leaves
only its residual path: a ``ResnetBlock2D`` without ``conv_shortcut`` or resampling, a
``Transformer2DModel`` on continuous inputs (Stable Diffusion), and an ``Attention`` with
``residual_connection=True`` (UNet2DModel's self-attention). A block's removal score is the MSE
between the whole UNet's output with the block removed and the intact output, on fixed calibration
inputs, one block at a time (one-shot). LAPTOP-Diff observes that these losses are additive: removing
a set of blocks costs about the sum of their single-block losses, which is what makes ranking blocks
by their single-block scores, and choosing a set by summing them, valid.

Removal is a forward hook that replaces the block's output by its residual path, so the model itself
is never changed: the hooks are removed when scoring ends.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from deploykit.models.wrappers import tensor_view
from deploykit.prune.gradients import GradientData

# forward(model) -> the model's output for the caller's fixed calibration inputs
OutputForward = Callable[[nn.Module], torch.Tensor]


def _residual_scale(block: nn.Module) -> float | None:
    """What a removable block divides its residual path by; None if ``block`` is not removable."""
    from diffusers.models.attention_processor import Attention
    from diffusers.models.resnet import ResnetBlock2D
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    if isinstance(block, ResnetBlock2D):
        same_shape = (block.conv_shortcut is None and block.upsample is None and block.downsample is None
                      and block.in_channels == block.conv2.out_channels)
        return block.output_scale_factor if same_shape else None
    if isinstance(block, Transformer2DModel):
        return 1.0 if block.is_input_continuous else None  # patched / vectorised inputs have no residual
    if isinstance(block, Attention):
        return block.rescale_output_factor if block.residual_connection else None
    return None


def removable_blocks(model: nn.Module) -> dict[str, nn.Module]:
    """The removable blocks of a diffusers UNet, by module name, in module order."""
    return {name: m for name, m in model.named_modules() if name and _residual_scale(m) is not None}


def _block_input(args: tuple, kwargs: dict) -> torch.Tensor:
    if args:
        return args[0]
    for key in ("hidden_states", "input_tensor"):  # Attention / Transformer2DModel, ResnetBlock2D
        if key in kwargs:
            return kwargs[key]
    raise TypeError("could not find the block's input among its arguments")


def _shaped_like(output, x: torch.Tensor):
    """``x`` in the structure the block returns: a tensor, a tuple (``return_dict=False``) or an output dataclass."""
    if isinstance(output, torch.Tensor):
        return x
    if isinstance(output, tuple):
        return (x, *output[1:])
    return type(output)(sample=x)  # Transformer2DModelOutput


@contextmanager
def removed_blocks(model: nn.Module, names: Iterable[str]) -> Iterator[None]:
    """Within the context, each named block outputs its residual path only (input / output scale)."""
    modules = dict(model.named_modules())
    handles = []
    try:
        for name in names:
            block = modules[name]
            scale = _residual_scale(block)
            if scale is None:
                raise ValueError(f"{name} is not a removable block")

            def hook(module, args, kwargs, output, scale=scale):
                x = _block_input(args, kwargs)
                return _shaped_like(output, x if scale == 1 else x / scale)

            handles.append(block.register_forward_hook(hook, with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def _evaluating(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def removal_loss(model: nn.Module, forward: OutputForward, names: Iterable[str],
                 reference: torch.Tensor | None = None) -> float:
    """MSE between the output with ``names`` removed together and the intact output (``reference`` if given)."""
    with _evaluating(model):
        if reference is None:
            reference = forward(model)
        with removed_blocks(model, names):
            return F.mse_loss(forward(model).float(), reference.float()).item()


def block_removal_scores(model: nn.Module, forward: OutputForward) -> dict[str, float]:
    """Each removable block's removal score: the output MSE when that block alone is removed.

    ``forward(model)`` returns the output for the caller's fixed calibration inputs; it is called once
    intact and once per block, so it must be deterministic (draw its inputs before, not inside).
    """
    with _evaluating(model):
        reference = forward(model)
        return {name: removal_loss(model, forward, [name], reference) for name in removable_blocks(model)}


def rank_blocks(scores: Mapping[str, float]) -> list[tuple[str, float]]:
    """(block, score), least important first; ties in module-name order, so the ranking is deterministic."""
    return sorted(scores.items(), key=lambda item: (item[1], item[0]))


@dataclass
class RemovalPlan:
    blocks: list[str]        # to remove, least important first
    predicted_loss: float    # sum of their single-block scores (the additive assumption)
    saved: float             # sum of their costs


def additive_removal_plan(scores: Mapping[str, float], cost: Mapping[str, float], budget: float) -> RemovalPlan:
    """The blocks to remove so that their summed ``cost`` (e.g. MACs or latency) reaches ``budget`` at the
    least predicted loss, the loss of a set being the sum of its blocks' scores (LAPTOP-Diff's additivity).

    That makes it a knapsack problem; blocks are taken greedily by loss per unit of cost, then any block
    the budget no longer needs is put back, largest loss first (a block that costs no loss stays removed).
    Raises if all blocks together save too little.
    """
    candidates = [name for name in scores if cost.get(name, 0) > 0]
    if sum(cost[name] for name in candidates) < budget:
        raise ValueError(f"removing every block saves {sum(cost[n] for n in candidates):g}, less than {budget:g}")
    chosen, saved = [], 0.0
    for name in sorted(candidates, key=lambda n: (scores[n] / cost[n], n)):
        if saved >= budget:
            break
        chosen.append(name)
        saved += cost[name]
    for name in sorted(chosen, key=lambda n: (-scores[n], n)):  # greedy can overshoot: drop what is not needed
        if scores[name] > 0 and saved - cost[name] >= budget:
            chosen.remove(name)
            saved -= cost[name]
    blocks = [name for name, _ in rank_blocks({n: scores[n] for n in chosen})]
    return RemovalPlan(blocks, sum(scores[n] for n in blocks), saved)


def calibration_timesteps(num_timesteps: int, count: int) -> list[int]:
    """``count`` timesteps at the centres of equal slices of [0, T): the whole schedule, seen evenly."""
    return [int((i + 0.5) * num_timesteps / count) for i in range(count)]


def calibration_forward(data: GradientData) -> OutputForward:
    """Calibration for block removal: ``data.batches`` batches of training images, noised at one timestep each
    (:func:`calibration_timesteps`), with ``data.conditioning`` for Stable Diffusion UNets.

    Images, noise and timesteps are drawn here, once, so every call sees the same inputs.
    """
    gen = torch.Generator().manual_seed(data.seed)
    batches = []
    for step in calibration_timesteps(data.num_timesteps, data.batches):
        x0 = data.fixed_batch(gen)
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.full((len(x0),), step, dtype=torch.long)
        batches.append((data.noise_scheduler.add_noise(x0, noise, t), t, data.conditioning_for(len(x0))))

    def forward(model: nn.Module) -> torch.Tensor:
        view = tensor_view(model)  # UNet2DModel and UNet2DConditionModel (SDXL's added_cond_kwargs) alike
        return torch.cat([view(xt, t, *cond) for xt, t, cond in batches])

    return forward
