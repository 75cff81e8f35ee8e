"""The distillation loop, on accelerate: one process, or many under ``accelerate launch`` / ``torchrun`` (DDP).

Every step draws its whole batch (clean samples, noise, timesteps) from a generator seeded by
``(seed, step)``, on every process alike; the batch is then cut into ``processes x
gradient_accumulation`` equal shards and each process takes its own, one per micro-step. The
gradient DDP averages is therefore that of the whole batch, and a run's numbers depend neither on
timing, nor on how many processes share it, nor on where it was resumed. Only the main process
writes checkpoints; every process reads them.

Per step: the student (with its tap projections, one module so DDP syncs both) and the teacher
see the same noised inputs; the enabled loss terms (:mod:`deploykit.distill.losses`) are summed
with their weights; AdamW steps with warm-up + cosine LR and gradient clipping; 2:4 masks are
re-applied; the EMA of the student's weights is updated. After ``adversarial_warmup`` steps the
discriminator joins: the student's adversarial term is taken through the unwrapped discriminator
with its weights frozen, then the discriminator steps on its own optimizer on detached predictions.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from deploykit.distill import losses
from deploykit.distill.checkpoint import Checkpoint
from deploykit.distill.losses import ChannelProjection, Discriminator
from deploykit.distill.sparse import MaskKeeper
from deploykit.distill.taps import Taps, attention_names, block_output_names
from deploykit.distributed import launched, process_state
from deploykit.models.objectives import denoising_target
from deploykit.models.wrappers import TensorOutput

TEACHER_TERMS = ("output_kd", "feature_kd", "attention_kd", "distribution_kd", "adversarial")


@dataclass
class Batch:
    """A step's clean samples and, for conditional UNets, each row's other UNet inputs
    (``encoder_hidden_states``; SDXL's ``text_embeds`` and ``time_ids``)."""

    sample: torch.Tensor
    cond: dict[str, torch.Tensor] = field(default_factory=dict)

    def rows(self, start: int, stop: int, device: torch.device) -> Batch:
        return Batch(self.sample[start:stop].to(device), {k: v[start:stop].to(device) for k, v in self.cond.items()})


def step_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def make_accelerator(mixed_precision: str = "no", gradient_accumulation_steps: int = 1):
    """An ``Accelerator`` for this process: CPU processes talk over gloo, GPUs over NCCL."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    kwargs = dict(mixed_precision=mixed_precision, gradient_accumulation_steps=gradient_accumulation_steps,
                  cpu=not torch.cuda.is_available())
    if launched():
        process_state()  # joins the process group with deploykit's barrier timeout, before accelerate would
    try:
        return Accelerator(**kwargs)
    except ValueError:
        # accelerate keeps its state per process and refuses a second run with another mixed precision
        # (a benchmark running several builds in one process). With one process nothing else holds
        # that state, so it is safe to start it afresh; under a launcher the launch decides.
        if launched():
            raise
        AcceleratorState._reset_state(reset_partial_state=True)
        return Accelerator(**kwargs)


def weights_digest(model: nn.Module) -> str:
    """A hash of a model's weights, to check that every DDP process ends with the same ones."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


class _Student(nn.Module):
    """The student UNet and the projections of its taps: what the student's optimizer trains, as one
    module so that DDP syncs the projections' gradients too. Returns the noise prediction and the
    projected tap tensors."""

    def __init__(self, unet: nn.Module, taps: Taps | None, projections: nn.ModuleDict, keys: dict[str, str]):
        super().__init__()
        self.model = TensorOutput(unet)
        self.projections = projections
        self.taps = taps
        self.keys = keys  # tap name -> its key in ``projections`` (ModuleDict keys cannot hold dots)

    def forward(self, sample, timestep, **cond) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if not self.taps:
            return self.model(sample, timestep, **cond), {}
        with self.taps.recording() as recorded:
            eps = self.model(sample, timestep, **cond)
        return eps, {name: self._project(name, value) for name, value in recorded.items()}

    def _project(self, name: str, value: torch.Tensor) -> torch.Tensor:
        key = self.keys[name]
        return self.projections[key](value) if key in self.projections else value


def _lr_factor(step: int, steps: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    done = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * done))


class DistillTrainer:
    """``DistillTrainer(student, teacher, noise_scheduler, batches, config, ...).train()`` -> (student, losses).

    ``batches(step, generator)`` returns a step's whole batch of clean samples (a tensor, or a
    :class:`Batch` with conditioning), drawing any randomness from ``generator``. ``config`` is a
    :class:`deploykit.distill.DistillConfig`. ``accelerator``: pass one to share it with the caller
    (data preparation under ``main_process_first``); by default one is made from the config.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, noise_scheduler,
                 batches: Callable[[int, torch.Generator], torch.Tensor | Batch], config,
                 checkpoint_dir: str | Path | None = None, on_step: Callable[[int, dict], None] | None = None,
                 masks: MutableMapping[str, torch.Tensor] | None = None, accelerator=None):
        self.student, self.teacher, self.noise_scheduler = student, teacher, noise_scheduler
        self.batches, self.config, self.on_step = batches, config, on_step
        self.accelerator = accelerator or make_accelerator(config.mixed_precision, config.gradient_accumulation)
        self.checkpoint = Checkpoint(checkpoint_dir) if checkpoint_dir else None
        self.keeper = MaskKeeper(student, masks, config.mask_mode, config.sr_ste_decay)
        self.weights = config.weights()
        self.replica_digests: list[str] = []

    # -- setup -----------------------------------------------------------------------------------

    def _uses(self, term: str) -> bool:
        return self.weights.get(term, 0.0) > 0

    def _tap_names(self) -> tuple[list[str], list[str]]:
        features = block_output_names(self.student) if self._uses("feature_kd") else []
        attention = attention_names(self.student) if self._uses("attention_kd") else []
        if self._uses("attention_kd") and not attention:
            raise ValueError("attention_kd_weight > 0, but the UNet has no attention layers to distil")
        return features, attention

    def _projections(self, taps_s: Taps, taps_t: Taps, example: Batch) -> tuple[nn.ModuleDict, dict[str, str]]:
        """One :class:`ChannelProjection` per tap whose student width differs from the teacher's, read off
        one forward pass of both models on one sample."""
        t = torch.full((1,), self.noise_scheduler.config.num_train_timesteps // 2, device=example.sample.device)
        with torch.no_grad(), taps_s.recording() as fs, taps_t.recording() as ft:
            TensorOutput(self.student)(example.sample, t, **example.cond)
            TensorOutput(self.teacher)(example.sample, t, **example.cond)
        projections, keys = nn.ModuleDict(), {}
        for name in taps_s.names:
            keys[name] = name.replace(".", "_")
            s, tt = fs[name], ft[name]
            channel = 1 if s.dim() == 4 else -1
            if s.shape[:channel] != tt.shape[:channel] or (channel == 1 and s.shape[2:] != tt.shape[2:]):
                raise ValueError(f"tap {name}: student {tuple(s.shape)} and teacher {tuple(tt.shape)} differ beyond width")
            if s.shape[channel] != tt.shape[channel]:
                projections[keys[name]] = ChannelProjection(s.shape[channel], tt.shape[channel])
        return projections, keys

    def _setup(self) -> None:
        acc, cfg = self.accelerator, self.config
        device = acc.device
        self.homes = next(self.student.parameters()).device, next(self.teacher.parameters()).device
        self.teacher.to(device).eval().requires_grad_(False)
        self.student.to(device).train()
        self.keeper.start()  # before the optimizer, the EMA and the checkpoint: see MaskKeeper
        self.needs_teacher = any(self._uses(term) for term in TEACHER_TERMS)
        features, attention = self._tap_names()
        self.feature_names, self.attention_names = features, attention
        self.student_taps = taps_s = Taps(self.student, features, attention)
        self.teacher_taps = Taps(self.teacher, features, attention)
        example = None
        if taps_s or self._uses("adversarial"):  # one sample, for the widths and channel counts
            example = self._batch(0, step_generator(cfg.seed, 0)).rows(0, 1, device)
        # the new modules start from the same seeded weights in every process (and in a resumed run)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            projections, keys = self._projections(taps_s, self.teacher_taps, example) if taps_s else (nn.ModuleDict(), {})
            self.discriminator = (Discriminator(example.sample.shape[1],
                                                num_train_timesteps=self.noise_scheduler.config.num_train_timesteps)
                                  if self._uses("adversarial") else None)
        self.model = _Student(self.student, taps_s, projections, keys).to(device)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.ema = None
        if cfg.ema_decay > 0:
            from diffusers.training_utils import EMAModel

            self.ema = EMAModel(self.student.parameters(), decay=cfg.ema_decay)
        modules, optimizers = {"model": self.student, "heads": projections}, {"optim": self.optimizer}
        if self.discriminator is not None:
            self.discriminator.to(device)
            # GAN practice: a low first-moment beta keeps the critic responsive to a moving target
            self.disc_optimizer = torch.optim.AdamW(self.discriminator.parameters(), lr=cfg.discriminator_lr,
                                                    betas=(0.5, 0.999))
            modules["disc"], optimizers["disc_optim"] = self.discriminator, self.disc_optimizer
        self.start, self.history = self.checkpoint.load(modules, optimizers, self.ema) if self.checkpoint else (0, [])
        if self.ema is not None:
            self.ema.to(device)
        self._saved = (modules, optimizers)
        if self.discriminator is not None:
            self.model, self.optimizer, self.disc, self.disc_optimizer = acc.prepare(
                self.model, self.optimizer, self.discriminator, self.disc_optimizer)
        else:
            self.model, self.optimizer = acc.prepare(self.model, self.optimizer)

    # -- one step --------------------------------------------------------------------------------

    def _batch(self, step: int, gen: torch.Generator) -> Batch:
        out = self.batches(step, gen)
        return out if isinstance(out, Batch) else Batch(out)

    def _draw(self, step: int) -> tuple[Batch, torch.Tensor, torch.Tensor]:
        """The step's whole batch, noise and timesteps, in the order earlier versions drew them."""
        gen = step_generator(self.config.seed, step)
        batch = self._batch(step, gen)
        noise = torch.randn(batch.sample.shape, generator=gen)
        t = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (batch.sample.shape[0],), generator=gen)
        return batch, noise, t

    def _terms(self, batch: Batch, noise: torch.Tensor, t: torch.Tensor, adversarial: bool
               ) -> tuple[dict[str, torch.Tensor], tuple | None]:
        """The enabled loss terms of one micro-batch, and (after the warm-up) the critic's inputs."""
        acc = self.accelerator
        xt = self.noise_scheduler.add_noise(batch.sample, noise, t)
        with acc.autocast():
            eps_s, taps_s = self.model(xt, t, **batch.cond)
            if self.needs_teacher:
                with torch.no_grad(), self.teacher_taps.recording() as taps_t:
                    eps_t = TensorOutput(self.teacher)(xt, t, **batch.cond)
        eps_s = eps_s.float()
        terms = {"denoise": F.mse_loss(eps_s, denoising_target(self.noise_scheduler, batch.sample, noise, t))}
        if self._uses("output_kd"):
            terms["output_kd"] = F.mse_loss(eps_s, eps_t.float())
        if self._uses("feature_kd"):
            terms["feature_kd"] = torch.stack([losses.normalized_feature_loss(taps_s[n], taps_t[n])
                                               for n in self.feature_names]).mean()
        if self._uses("attention_kd"):
            terms["attention_kd"] = torch.stack([losses.normalized_feature_loss(taps_s[n], taps_t[n])
                                                 for n in self.attention_names]).mean()
        if self._uses("distribution_kd"):
            terms["distribution_kd"] = losses.distribution_kd_loss(eps_s, eps_t, self.config.distribution_temperature)
        if adversarial:
            # the student's term through the plain critic, frozen: its gradient reaches the student only
            critic = acc.unwrap_model(self.disc).requires_grad_(False)
            terms["adversarial"] = losses.generator_hinge_loss(critic(xt, eps_s, t))
            critic.requires_grad_(True)
            return terms, (xt, eps_t.detach().float(), eps_s.detach(), t)
        return terms, None

    def _critic_loss(self, xt: torch.Tensor, eps_t: torch.Tensor, eps_s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        # teacher and student predictions in one forward pass: DDP expects one forward per backward
        logits = self.disc(torch.cat([xt, xt]), torch.cat([eps_t, eps_s]), torch.cat([t, t]))
        real, fake = logits.chunk(2)
        return losses.discriminator_hinge_loss(real, fake)

    def _step(self, step: int) -> dict:
        acc, cfg = self.accelerator, self.config
        batch, noise, t = self._draw(step)
        shards = acc.num_processes * cfg.gradient_accumulation
        if batch.sample.shape[0] % shards:
            raise ValueError(f"a batch of {batch.sample.shape[0]} does not split into {acc.num_processes} processes x "
                             f"{cfg.gradient_accumulation} accumulation steps")
        size = batch.sample.shape[0] // shards
        for group in self.optimizer.param_groups:
            group["lr"] = cfg.lr * _lr_factor(step, cfg.steps, cfg.warmup_steps)
        adversarial = self.discriminator is not None and step >= cfg.adversarial_warmup
        sums: dict[str, torch.Tensor] = {}
        models = (self.model, self.disc) if self.discriminator is not None else (self.model,)
        for micro in range(cfg.gradient_accumulation):
            start = (micro * acc.num_processes + acc.process_index) * size
            rows = batch.rows(start, start + size, acc.device)
            with acc.accumulate(*models):
                terms, critic_inputs = self._terms(rows, noise[start:start + size].to(acc.device),
                                                   t[start:start + size].to(acc.device), adversarial)
                loss = sum(self.weights[k] * v for k, v in terms.items() if self.weights[k])
                acc.backward(loss)
                if acc.sync_gradients and cfg.grad_clip:
                    acc.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                terms = {"loss": loss, **terms}
                if critic_inputs is not None:
                    terms["discriminator"] = critic_loss = self._critic_loss(*critic_inputs)
                    acc.backward(critic_loss)
                    self.disc_optimizer.step()
                    self.disc_optimizer.zero_grad(set_to_none=True)
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + v.detach().float() / cfg.gradient_accumulation
        self.keeper.after_step()
        if self.ema is not None:
            self.ema.step(self.student.parameters())
        # what every process saw, averaged: the whole batch's loss terms
        values = acc.reduce(torch.stack(list(sums.values())), reduction="mean") if acc.num_processes > 1 \
            else torch.stack(list(sums.values()))
        return {"step": step + 1, **{k: v.item() for k, v in zip(sums, values)}}

    # -- the run ---------------------------------------------------------------------------------

    def _save(self, step: int) -> None:
        if self.accelerator.is_main_process:
            modules, optimizers = self._saved
            self.checkpoint.save(step, modules, optimizers, self.history, self.ema)
        self.accelerator.wait_for_everyone()  # nobody runs ahead of a checkpoint it might resume from

    def train(self) -> tuple[nn.Module, list[dict]]:
        cfg, acc = self.config, self.accelerator
        self._setup()
        for step in range(self.start, cfg.steps):
            record = self._step(step)
            self.history.append(record)
            if self.on_step:
                self.on_step(step + 1, record)
            if self.checkpoint and ((step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps):
                self._save(step + 1)
        if self.ema is not None:
            self.ema.copy_to(self.student.parameters())  # the averaged weights are the result
        self.keeper.finish()
        self.student_taps.remove()
        self.teacher_taps.remove()
        digests = [weights_digest(self.student)]
        if acc.num_processes > 1:
            from accelerate.utils import gather_object

            digests = gather_object(digests)
            if len(set(digests)) != 1:
                raise RuntimeError(f"the {acc.num_processes} processes ended with different student weights: DDP lost sync")
        self.replica_digests = digests
        acc.wait_for_everyone()
        self.teacher.to(self.homes[1])
        return self.student.to(self.homes[0]).eval(), self.history
