"""Training checkpoints as safetensors + JSON: never a pickle, so loading one runs no code.

One tensor file per checkpoint holds every module's weights (``model.*`` the student, ``heads.*`` the
tap projections, ``disc.*`` the discriminator), every optimizer's state (``optim.<i>.<name>``,
``disc_optim.<i>.<name>``) and the EMA weights (``ema.<i>``); ``checkpoint.json`` holds the step, the
loss log, the optimizers' param groups and the EMA's counters. We keep this format rather than
``accelerator.save_state``, which writes optimizer and RNG state with ``torch.save`` (a pickle). No
RNG state is needed: every step draws its numbers from a generator seeded by ``(seed, step)``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from deploykit.io import atomic_write_json, load_tensors, save_tensors

META = "checkpoint.json"


def _optimizer_tensors(prefix: str, optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list]:
    state = optimizer.state_dict()
    tensors = {}
    for idx, st in state["state"].items():
        for name, value in st.items():
            tensors[f"{prefix}.{idx}.{name}"] = value if torch.is_tensor(value) else torch.tensor(value)
    return tensors, state["param_groups"]


class Checkpoint:
    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.meta = self.folder / META

    def exists(self) -> bool:
        return self.meta.is_file()

    def step(self) -> int:
        return json.loads(self.meta.read_text())["step"] if self.exists() else 0

    def save(self, step: int, modules: Mapping[str, nn.Module], optimizers: Mapping[str, torch.optim.Optimizer],
             losses: list[dict], ema=None) -> None:
        tensors: dict[str, torch.Tensor] = {}
        meta: dict = {"step": step, "weights": f"step-{step}.safetensors", "losses": losses, "param_groups": {}}
        for prefix, module in modules.items():
            tensors.update({f"{prefix}.{k}": v for k, v in module.state_dict().items()})
        for prefix, optimizer in optimizers.items():
            opt_tensors, meta["param_groups"][prefix] = _optimizer_tensors(prefix, optimizer)
            tensors.update(opt_tensors)
        if ema is not None:
            state = ema.state_dict()
            tensors.update({f"ema.{i}": p for i, p in enumerate(state.pop("shadow_params"))})
            meta["ema"] = state
        save_tensors(self.folder / meta["weights"], tensors)
        # the JSON names the tensor file; written second, so it only ever points at a complete file
        atomic_write_json(self.meta, meta)
        for old in self.folder.glob("step-*.safetensors"):
            if old.name != meta["weights"]:
                old.unlink(missing_ok=True)

    def load(self, modules: Mapping[str, nn.Module], optimizers: Mapping[str, torch.optim.Optimizer],
             ema=None) -> tuple[int, list[dict]]:
        """Restore everything :meth:`save` wrote; returns (step, losses), or (0, []) without a checkpoint."""
        if not self.exists():
            return 0, []
        meta = json.loads(self.meta.read_text())
        tensors = load_tensors(self.folder / meta["weights"])

        def under(prefix: str) -> dict[str, torch.Tensor]:
            return {k.removeprefix(prefix + "."): v for k, v in tensors.items() if k.startswith(prefix + ".")}

        for prefix, module in modules.items():
            module.load_state_dict(under(prefix))
        for prefix, optimizer in optimizers.items():
            state: dict = {"state": {}, "param_groups": meta["param_groups"][prefix]}
            for key, value in under(prefix).items():
                idx, name = key.split(".", 1)
                state["state"].setdefault(int(idx), {})[name] = value
            optimizer.load_state_dict(state)
        if ema is not None:
            shadow = under("ema")
            ema.load_state_dict({**meta["ema"], "shadow_params": [shadow[str(i)] for i in range(len(shadow))]})
        return meta["step"], meta["losses"]
