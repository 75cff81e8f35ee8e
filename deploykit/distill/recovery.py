"""Recovery fine-tuning of a pruned student against its dense teacher.

Loss = ``denoise_weight`` * ||eps_student - eps||^2 + ``output_kd_weight`` * ||eps_student - eps_teacher||^2
on noised samples of the caller's data at uniformly drawn timesteps. The first term is Diff-Pruning's
recovery; the second is output knowledge distillation, which the full DaKD objective extends.

The algorithm never owns the data: ``batches(step)`` returns the clean batch for a step. Because the
batch, the timesteps and the noise of step ``k`` are drawn from generators seeded by ``(seed, k)``,
a run resumed from a checkpoint continues with exactly the numbers it would have seen.

A 2:4 student (``masks`` from :func:`deploykit.sparsity.sparsify`) stays 2:4. ``mask_mode="fixed"``
re-applies the masks after every optimizer step (the masks chosen once, as NVIDIA's ASP does).
``"sr-ste"`` keeps dense weights, runs the forward pass with the 2:4 magnitude mask of the current
weights (re-chosen every step, so a weight can come back), passes gradients straight through and
adds ``sr_ste_decay * (1 - mask) * w`` to the gradient of the masked-out weights, which pulls them
towards zero so the masks settle (SR-STE, Zhou et al., ICLR 2021; SparseDM fine-tunes diffusion
UNets with it). At the end the weights are masked and ``masks`` holds the final choice.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, MutableMapping
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from deploykit.io import atomic_write_json, load_tensors, save_tensors
from deploykit.sparsity import apply_masks, check_2to4, magnitude_mask

MASK_MODES = ("fixed", "sr-ste")


@dataclass
class RecoveryConfig:
    steps: int = 300
    lr: float = 5e-4
    warmup_steps: int = 20
    weight_decay: float = 0.0
    denoise_weight: float = 1.0
    output_kd_weight: float = 1.0
    grad_clip: float = 1.0
    checkpoint_every: int = 50
    seed: int = 0
    mask_mode: str = "fixed"       # 2:4 students: "fixed" or "sr-ste"
    sr_ste_decay: float = 2e-4     # sr-ste: lambda_W of SR-STE


def _step_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def _lr_factor(cfg: RecoveryConfig, step: int) -> float:
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    done = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * done))


class _SparseRefinedSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight: torch.Tensor, decay: float) -> torch.Tensor:
        mask = magnitude_mask(weight)
        ctx.save_for_backward(weight, mask)
        ctx.decay = decay
        return weight * mask

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        weight, mask = ctx.saved_tensors
        return grad + ctx.decay * weight * (~mask), None


class _SRSTEWeight(nn.Module):
    """A parametrization: the layer sees the 2:4-masked weight; the optimizer updates the dense one."""

    def __init__(self, decay: float):
        super().__init__()
        self.decay = decay

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return _SparseRefinedSTE.apply(weight, self.decay)


def _start_sr_ste(student: nn.Module, masks: MutableMapping[str, torch.Tensor], decay: float) -> None:
    for name in masks:
        parametrize.register_parametrization(student.get_submodule(name), "weight", _SRSTEWeight(decay))


def _finish_sr_ste(student: nn.Module, masks: MutableMapping[str, torch.Tensor]) -> None:
    for name in masks:
        module = student.get_submodule(name)
        with torch.no_grad():
            masks[name] = magnitude_mask(module.parametrizations.weight.original)
        parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)  # keeps the masked weight


class _Checkpoint:
    """Student weights, optimizer state and the step, as safetensors + JSON (never a pickle)."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.meta = folder / "checkpoint.json"

    def save(self, step: int, student: nn.Module, opt: torch.optim.Optimizer, losses: list[dict]) -> None:
        tensors = {f"model.{k}": v for k, v in student.state_dict().items()}
        state = opt.state_dict()
        for idx, st in state["state"].items():
            for name, value in st.items():
                tensors[f"optim.{idx}.{name}"] = value if torch.is_tensor(value) else torch.tensor(value)
        save_tensors(self.folder / f"step-{step}.safetensors", tensors)
        # the JSON names the tensor file; written second, so it only ever points at a complete file
        atomic_write_json(self.meta, {"step": step, "weights": f"step-{step}.safetensors", "losses": losses,
                                      "param_groups": state["param_groups"]})
        for old in self.folder.glob("step-*.safetensors"):
            if old.name != f"step-{step}.safetensors":
                old.unlink(missing_ok=True)

    def load(self, student: nn.Module, opt: torch.optim.Optimizer) -> tuple[int, list[dict]]:
        if not self.meta.is_file():
            return 0, []
        meta = json.loads(self.meta.read_text())
        tensors = load_tensors(self.folder / meta["weights"])
        student.load_state_dict({k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")})
        state: dict = {"state": {}, "param_groups": meta["param_groups"]}
        for key, value in tensors.items():
            if key.startswith("optim."):
                _, idx, name = key.split(".", 2)
                state["state"].setdefault(int(idx), {})[name] = value
        opt.load_state_dict(state)
        return meta["step"], meta["losses"]


def recover(
    student: nn.Module,
    teacher: nn.Module,
    noise_scheduler,
    batches: Callable[[int, torch.Generator], torch.Tensor],
    config: RecoveryConfig,
    checkpoint_dir: str | Path | None = None,
    on_step: Callable[[int, dict], None] | None = None,
    masks: MutableMapping[str, torch.Tensor] | None = None,
) -> tuple[nn.Module, list[dict]]:
    """Fine-tune ``student`` in place; returns it and the per-step loss terms.

    ``batches(step, generator)`` returns the clean images of a step, drawing any randomness from
    ``generator``. ``noise_scheduler`` is a diffusers training scheduler (``add_noise``). ``masks``
    (module name -> 2:4 bool mask) keeps a sparse student sparse; under ``mask_mode="sr-ste"`` the
    dict is updated in place with the masks the training settled on.
    """
    if config.mask_mode not in MASK_MODES:
        raise ValueError(f"mask_mode {config.mask_mode!r} is not one of {MASK_MODES}")
    teacher.eval().requires_grad_(False)
    student.train()
    sr_ste = bool(masks) and config.mask_mode == "sr-ste"
    if masks and not sr_ste:
        apply_masks(student, masks)
    if sr_ste:
        # before the optimizer and the checkpoint: both see the dense weights under their parametrized names
        _start_sr_ste(student, masks, config.sr_ste_decay)
    opt = torch.optim.AdamW(student.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    ckpt = _Checkpoint(Path(checkpoint_dir)) if checkpoint_dir else None
    start, losses = ckpt.load(student, opt) if ckpt else (0, [])
    num_t = noise_scheduler.config.num_train_timesteps
    for step in range(start, config.steps):
        gen = _step_generator(config.seed, step)
        x0 = batches(step, gen)
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, num_t, (x0.shape[0],), generator=gen)
        xt = noise_scheduler.add_noise(x0, noise, t)
        for group in opt.param_groups:
            group["lr"] = config.lr * _lr_factor(config, step)
        eps_s = student(xt, t).sample
        terms = {"denoise": F.mse_loss(eps_s, noise)}
        if config.output_kd_weight > 0:
            with torch.no_grad():
                eps_t = teacher(xt, t).sample
            terms["output_kd"] = F.mse_loss(eps_s, eps_t)
        loss = config.denoise_weight * terms["denoise"] + config.output_kd_weight * terms.get("output_kd", 0.0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if config.grad_clip:
            torch.nn.utils.clip_grad_norm_(student.parameters(), config.grad_clip)
        opt.step()
        if masks and not sr_ste:
            apply_masks(student, masks)
        record = {"step": step + 1, "loss": loss.item(), **{k: v.item() for k, v in terms.items()}}
        losses.append(record)
        if on_step:
            on_step(step + 1, record)
        if ckpt and ((step + 1) % config.checkpoint_every == 0 or step + 1 == config.steps):
            ckpt.save(step + 1, student, opt, losses)
    if sr_ste:
        _finish_sr_ste(student, masks)
    if masks:
        bad = check_2to4(student, masks)
        if bad:  # a bug, not bad input: every path above leaves the masked weights 2:4
            raise RuntimeError("recovery left weights that are not 2:4: " + "; ".join(map(str, bad[:3])))
    return student.eval(), losses


def config_dict(config: RecoveryConfig) -> dict:
    return asdict(config)
