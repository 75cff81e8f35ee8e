"""``deploykit zoo train shapes``: a text-to-image teacher with SD1.5's component types, from scratch.

In order: the attribute classifier (its own images and seed: it judges the teacher, so it never sees
the teacher's data); the AutoencoderKL on the teacher's images, its ``scaling_factor`` set from the
latents' std as SD's; the CLIP text encoder and the UNet jointly on those latents, one caption in ten
dropped to "" for classifier-free guidance; then the teacher's prompt accuracy, sampled with the
registry's sampler, on the evaluation prompts. Every setting comes from ``deploykit.zoo.registry``
and is written to the card, with the seconds each part took and the share of the CPU it got.
"""

from __future__ import annotations

import copy
import math
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from rich.progress import Progress

from deploykit.eval.attributes import CLASSIFIER_FILE, AttributeClassifier, save_attribute_classifier
from deploykit.io import atomic_write_json, make_temp_dir, replace_dir
from deploykit.models.objectives import denoising_target
from deploykit.zoo import shapes
from deploykit.zoo.registry import AttributeTraining, PipelineTraining, PipelineZooEntry, Sampling, VaeTraining
from deploykit.zoo.tokenizer import MAX_LENGTH, save_word_tokenizer


class Clock:
    """Wall and process CPU seconds of each part, so the card can say how much contention slowed it."""

    def __init__(self) -> None:
        self.parts: dict[str, dict[str, float]] = {}

    def part(self, name: str, fn: Callable, *args, **kwargs):
        wall, cpu = time.perf_counter(), time.process_time()
        out = fn(*args, **kwargs)
        self.parts[name] = {"wall_s": round(time.perf_counter() - wall, 1), "cpu_s": round(time.process_time() - cpu, 1)}
        return out

    def summary(self, threads: int) -> dict:
        wall = sum(p["wall_s"] for p in self.parts.values())
        cpu = sum(p["cpu_s"] for p in self.parts.values())
        return {"parts": self.parts, "wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "threads": threads,
                # 1.0: the process had its threads' cores to itself; less: others ran on them too
                "cpu_share": round(cpu / max(wall * threads, 1e-9), 3),
                # on shared cores, OpenMP's default spin-waiting burns the CPU share that compute needs
                "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),
                "load_average_at_end": [round(x, 2) for x in os.getloadavg()]}


def _lr_lambda(warmup: int, steps: int) -> Callable[[int], float]:
    def at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        done = (step - warmup) / max(1, steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * done)) * 0.95 + 0.05
    return at


def _ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float, step: int) -> None:
    decay = min(decay, (1 + step) / (10 + step))  # warm up: early weights must not dominate a short run
    with torch.no_grad():
        for pe, pm in zip(ema.parameters(), model.parameters()):
            pe.lerp_(pm, 1 - decay)


def _batch(images: np.ndarray, idx: torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
    return shapes.to_tensor(images[idx.numpy()]).to(device)


def _task(progress: Progress | None, name: str, total: int) -> Callable[[str], None]:
    """A progress bar's advance function (a no-op without a progress display)."""
    if progress is None:
        return lambda info: None
    task = progress.add_task(name, total=total, info="")
    every = max(1, total // 20)

    def advance(info: str) -> None:
        progress.update(task, advance=1, info=info)
        done = int(progress.tasks[task].completed)
        if not progress.console.is_terminal and (done % every == 0 or done == total):
            # a log file (nohup) gets a line every 5% instead of a live bar
            progress.console.print(f"{name}: {done}/{total} {info} ({progress.tasks[task].elapsed:.0f} s)")
    return advance


# ---- the attribute classifier --------------------------------------------------------------------

def _augment(x: torch.Tensor, cfg: AttributeTraining, gen: torch.Generator) -> torch.Tensor:
    sigma = torch.rand(len(x), 1, 1, 1, generator=gen) * cfg.noise
    return x + sigma * torch.randn(x.shape, generator=gen)


def train_attribute_classifier(cfg: AttributeTraining, progress: Progress | None = None,
                               device: torch.device | str = "cpu") -> tuple[AttributeClassifier, dict]:
    """Train on every combination; returns the model (on the CPU) and its accuracy per attribute on a held-out split."""
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    images, attrs = shapes.make_dataset(cfg.images, cfg.seed, held_out=None)
    labels = {name: torch.tensor([values.index(getattr(a, name)) for a in attrs]) for name, values in shapes.ATTRIBUTES.items()}
    n_held = int(round(cfg.images * cfg.held_out))
    train_idx, held_idx = torch.arange(n_held, cfg.images), torch.arange(n_held)
    model = AttributeClassifier(shapes.ATTRIBUTES).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=1e-4)
    steps = cfg.epochs * math.ceil(len(train_idx) / cfg.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=steps)
    advance = _task(progress, "attribute classifier", steps)
    for _ in range(cfg.epochs):
        model.train()
        perm = train_idx[torch.randperm(len(train_idx), generator=gen)]
        for i in range(0, len(perm), cfg.batch_size):
            idx = perm[i:i + cfg.batch_size]
            logits = model(_augment(_batch(images, idx), cfg, gen).to(device))
            loss = sum(F.cross_entropy(logits[name], labels[name][idx].to(device)) for name in logits)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            advance(f"loss {loss.item():.3f}")
    read = model.cpu().eval().read(shapes.to_tensor(images[held_idx.numpy()]))
    accuracy = {name: round(float(np.mean([v == getattr(attrs[i], name) for i, v in zip(held_idx.tolist(), read[name])])), 4)
                for name in shapes.ATTRIBUTES}
    return model, accuracy


# ---- the VAE -------------------------------------------------------------------------------------

def _foreground(x: torch.Tensor) -> torch.Tensor:
    """1 where a pixel differs from the plain background, 0 elsewhere (N, 1, H, W)."""
    background = shapes.to_tensor(np.array(shapes.BACKGROUND, dtype=np.uint8).reshape(1, 1, 1, 3))
    return ((x - background).abs().sum(1, keepdim=True) > 0.1).float()


def train_vae(entry: PipelineZooEntry, images: np.ndarray, cfg: VaeTraining, progress: Progress | None = None,
              device: torch.device | str = "cpu"):
    from diffusers import AutoencoderKL

    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    vae = AutoencoderKL(in_channels=3, out_channels=3, **entry.vae_config).to(device)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg.warmup_steps, cfg.steps))
    advance = _task(progress, "vae", cfg.steps)
    losses = []
    for step in range(cfg.steps):
        x = _batch(images, torch.randint(0, len(images), (cfg.batch_size,), generator=gen), device)
        posterior = vae.encode(x).latent_dist
        eps = torch.randn(posterior.mean.shape, generator=gen).to(device)
        recon = vae.decode(posterior.mean + posterior.std * eps).sample
        # the shapes cover a few percent of the pixels: weighted like the background, their colour is
        # learned last (a plain L1 VAE draws every shape grey for hundreds of steps)
        weight = 1.0 + (cfg.foreground_weight - 1.0) * _foreground(x)
        loss = (weight * (recon - x).abs()).mean() + cfg.kl_weight * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        advance(f"L1 {np.mean(losses[-50:]):.4f}")
    return vae.eval(), losses


@torch.no_grad()
def encode_latents(vae, images: np.ndarray, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """The posterior's mean and std of every image (training samples from it, as SD's training does),
    on the VAE's device."""
    device = next(vae.parameters()).device
    means, stds = [], []
    for i in range(0, len(images), batch_size):
        dist = vae.encode(shapes.to_tensor(images[i:i + batch_size]).to(device)).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
    return torch.cat(means), torch.cat(stds)


@torch.no_grad()
def vae_reconstruction_l1(vae, images: np.ndarray) -> float:
    x = shapes.to_tensor(images).to(next(vae.parameters()).device)
    return float(F.l1_loss(vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1), x))


# ---- the text encoder and the UNet ---------------------------------------------------------------

def build_text_encoder(entry: PipelineZooEntry, tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(vocab_size=len(tokenizer), max_position_embeddings=MAX_LENGTH,
                            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id, **entry.text_config)
    return CLIPTextModel(config)


def tokenize(tokenizer, prompts: list[str]) -> torch.Tensor:
    return tokenizer(prompts, padding="max_length", max_length=MAX_LENGTH, truncation=True, return_tensors="pt").input_ids


def _timesteps(num_train_timesteps: int, cfg: PipelineTraining, gen: torch.Generator) -> torch.Tensor:
    """Uniform training timesteps, with ``cfg.high_noise_share`` of them redrawn from the noisiest ones."""
    t = torch.randint(0, num_train_timesteps, (cfg.batch_size,), generator=gen)
    if cfg.high_noise_share > 0:
        noisy = torch.rand(cfg.batch_size, generator=gen) < cfg.high_noise_share
        t = torch.where(noisy, torch.randint(cfg.high_noise_from, num_train_timesteps, (cfg.batch_size,), generator=gen), t)
    return t


def _min_snr_weights(snr: torch.Tensor, gamma: float, v_prediction: bool) -> torch.Tensor:
    """Min-SNR-gamma loss weights: the easy low-noise steps must not pull the gradient away from the ones that
    decide layout and colour.

    In x0 terms an epsilon loss weighs SNR and a v loss SNR + 1; both are capped at gamma. (Hang et al.'s
    v form, min(SNR, gamma) / (SNR + 1), goes to 0 at the noisiest steps, which are the only ones where the
    prompt alone says where a shape goes.)
    """
    if v_prediction:
        return (snr + 1).clamp(max=gamma) / (snr + 1)
    return snr.clamp(max=gamma) / snr


def train_text_and_unet(entry: PipelineZooEntry, latents: tuple[torch.Tensor, torch.Tensor], scaling_factor: float,
                        input_ids: torch.Tensor, empty_ids: torch.Tensor, cfg: PipelineTraining,
                        progress: Progress | None = None, text_encoder=None, on_step: Callable | None = None,
                        device: torch.device | str = "cpu"):
    """Joint training on the entry's noise schedule and objective; returns the EMA text encoder and UNet.

    Every random draw comes from one CPU generator, so a run's data order and noise are the same on any device.
    """
    from diffusers import DDPMScheduler, UNet2DConditionModel

    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    unet = UNet2DConditionModel(**entry.unet_config)
    models = torch.nn.ModuleList([text_encoder, unet]).to(device)
    text, unet = models
    ema = copy.deepcopy(models).requires_grad_(False)
    noise_scheduler = DDPMScheduler(**{k: v for k, v in entry.scheduler.items() if k not in ("set_alpha_to_one",)})
    v_prediction = noise_scheduler.config.prediction_type == "v_prediction"
    alphas = noise_scheduler.alphas_cumprod.to(device)
    snr = alphas / (1 - alphas)
    input_ids, empty_ids = input_ids.to(device), empty_ids.to(device)
    opt = torch.optim.AdamW(models.parameters(), lr=cfg.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg.warmup_steps, cfg.steps))
    mean, std = latents
    advance = _task(progress, "text encoder + unet", cfg.steps)
    losses = []
    for step in range(cfg.steps):
        idx = torch.randint(0, len(mean), (cfg.batch_size,), generator=gen).to(mean.device)
        x0 = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen).to(device)) * scaling_factor
        ids = input_ids[idx].clone()
        ids[(torch.rand(cfg.batch_size, generator=gen) < cfg.caption_dropout).to(device)] = empty_ids
        noise = torch.randn(x0.shape, generator=gen).to(device)
        t = _timesteps(noise_scheduler.config.num_train_timesteps, cfg, gen).to(device)
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=cfg.bf16):
            hidden = text(ids)[0]
            pred = unet(noise_scheduler.add_noise(x0, noise, t), t, encoder_hidden_states=hidden).sample
        target = denoising_target(noise_scheduler, x0, noise, t)
        per_sample = F.mse_loss(pred.float(), target, reduction="none").mean(dim=(1, 2, 3))
        weights = _min_snr_weights(snr[t], cfg.snr_gamma, v_prediction) if cfg.snr_gamma > 0 else torch.ones_like(per_sample)
        loss = (per_sample * weights).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(models.parameters(), 1.0)
        opt.step()
        sched.step()
        _ema_update(ema, models, cfg.ema_decay, step)
        losses.append(per_sample.mean().item())
        advance(f"loss {np.mean(losses[-100:]):.4f}")
        if on_step is not None:
            on_step(step, ema)
    text_ema, unet_ema = ema
    return text_ema.eval(), unet_ema.eval(), losses


# ---- the pipeline ------------------------------------------------------------------------------

def make_pipeline(vae, text_encoder, tokenizer, unet, scheduler: dict):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=DDIMScheduler(**scheduler), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sampling_scheduler(pipe, name: str):
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    cls = {"ddim": DDIMScheduler, "dpm-solver++": DPMSolverMultistepScheduler}[name]
    return cls.from_config(pipe.scheduler.config)


@torch.no_grad()
def generate(pipe, prompts: list[str], sampling: Sampling, seed: int, batch_size: int = 64) -> torch.Tensor:
    """One image per prompt in [-1, 1]; image ``i`` from the generator ``seed + i`` (any batch size, same images)."""
    pipe.scheduler = sampling_scheduler(pipe, sampling.scheduler)
    res = pipe.unet.config.sample_size * pipe.vae_scale_factor
    out = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        gens = [torch.Generator().manual_seed(seed + start + i) for i in range(len(chunk))]
        images = pipe(chunk, num_inference_steps=sampling.steps, guidance_scale=sampling.guidance_scale,
                      height=res, width=res, generator=gens, output_type="pt").images
        out.append(images * 2 - 1)
    return torch.cat(out)


def save_pipeline(pipe, folder: Path) -> None:
    """The diffusers folder, weights in fp16 (the teacher loader casts back to fp32): safetensors only."""
    half = copy.deepcopy(pipe)
    half.to(torch.float16)
    half.save_pretrained(folder, safe_serialization=True)


# ---- the whole run -----------------------------------------------------------------------------

def train_pipeline_entry(entry: PipelineZooEntry, out_dir: Path, steps: int | None = None,
                         progress: Progress | None = None, device: str = "cpu") -> dict:
    """Train everything for ``entry`` on ``device``; write the pipeline folder, the classifier and the card
    atomically. Evaluation (prompt accuracy, FID) reads the samples on the CPU, whatever trained them."""
    from deploykit.eval.prompt_accuracy import (
        FID_REFERENCE_FILE,
        chance_accuracy,
        classifier_fid,
        fid_reference,
        prompt_accuracy,
        save_fid_reference,
        shuffled_prompt_accuracy,
    )

    teacher_cfg = entry.teacher if steps is None else PipelineTraining(**{**entry.settings()["teacher"], "steps": steps})
    clock = Clock()
    started_wall, started_cpu = time.perf_counter(), time.process_time()
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(out_dir.parent, f".{out_dir.name}.")
    try:
        classifier, classifier_accuracy = clock.part("classifier", train_attribute_classifier, entry.classifier, progress, device)
        images, attrs = clock.part("render", shapes.make_dataset, teacher_cfg.images, teacher_cfg.seed, held_out=False)
        vae, vae_losses = clock.part("vae", train_vae, entry, images[:entry.vae.images], entry.vae, progress,
                                     device)
        latents = clock.part("latents", encode_latents, vae, images)
        sampled = latents[0] + latents[1] * torch.randn(latents[0].shape, generator=torch.Generator().manual_seed(0)).to(device)
        scaling_factor = round(1.0 / float(sampled.std()), 5)
        vae.register_to_config(scaling_factor=scaling_factor)
        tokenizer = save_word_tokenizer(shapes.vocabulary(), tmp / "tokenizer")
        input_ids = tokenize(tokenizer, [shapes.caption(a) for a in attrs])
        text, unet, losses = clock.part(
            "text_encoder_unet", train_text_and_unet, entry, latents, scaling_factor, input_ids,
            tokenize(tokenizer, [""])[0], teacher_cfg, progress, text_encoder=build_text_encoder(entry, tokenizer),
            device=device)
        pipe = make_pipeline(vae, text, tokenizer, unet, entry.scheduler)
        prompts = shapes.evaluation_prompts(entry.sampling.prompts_per_split, entry.sampling.seed)
        samples = clock.part("teacher_samples", generate, pipe, prompts, entry.sampling, entry.sampling.seed).cpu()
        pipe.to("cpu")
        accuracy = prompt_accuracy(classifier, samples, prompts)
        shuffled = shuffled_prompt_accuracy(classifier, samples, prompts)
        reference = fid_reference(classifier, prompts)
        save_pipeline(pipe, tmp)
        save_attribute_classifier(classifier, tmp / CLASSIFIER_FILE)
        save_fid_reference(reference, tmp / FID_REFERENCE_FILE)
        threads = torch.get_num_threads()
        card = {
            "name": entry.name, "description": entry.description, "dataset": entry.dataset, "kind": entry.kind,
            "resolution": entry.resolution,
            "settings": {**entry.settings(), "teacher": teacher_cfg.__dict__},
            "configs": {"unet": entry.unet_config, "vae": {**entry.vae_config, "scaling_factor": scaling_factor},
                        "text_encoder": entry.text_config, "scheduler": entry.scheduler},
            "held_out_combinations": sorted(" ".join(p) for p in shapes.HELD_OUT),
            "params": {name: sum(p.numel() for p in m.parameters())
                       for name, m in (("unet", unet), ("text_encoder", text), ("vae", vae), ("classifier", classifier))},
            "classifier_accuracy": classifier_accuracy,
            "classifier_held_out_accuracy": min(classifier_accuracy.values()),
            "vae_reconstruction_l1": round(vae_reconstruction_l1(vae, images[-256:]), 5),
            "vae_final_loss_mean_last_100": round(float(np.mean(vae_losses[-100:])), 5),
            "final_loss_mean_last_100": round(float(np.mean(losses[-100:])), 5),
            "teacher_prompt_accuracy": {**_rounded(accuracy), "prompts": len(prompts), "images_per_prompt": 1,
                                        "sampling": entry.sampling.__dict__,
                                        # the same images against shuffled prompts: what ignoring the prompt scores
                                        "shuffled_prompts": round(shuffled["accuracy"], 4),
                                        "chance": round(chance_accuracy(), 4)},
            "fid": {"teacher": round(classifier_fid(classifier, samples, reference), 4),
                    "real_floor": round(reference["floor"], 4), "reference_images": reference["reference_images"],
                    "floor_images": reference["floor_images"],
                    "features": f"attribute classifier, {classifier.num_features}-d penultimate layer"},
            "time": clock.summary(threads),
            "torch": torch.__version__,
            "device": _device_name(device),
            "command": f"deploykit zoo train {entry.name}" + ("" if steps is None else f" --steps {steps}")
                       + ("" if device == "cpu" else f" --device {device}"),
        }
        # everything, from the first image rendered to the card (tokenizer, FID reference, saving included)
        card["time"]["total_wall_s"] = round(time.perf_counter() - started_wall, 1)
        card["time"]["total_cpu_s"] = round(time.process_time() - started_cpu, 1)
        card["train_seconds"] = card["time"]["total_wall_s"]
        atomic_write_json(tmp / "card.json", card)
        replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return card


def _device_name(device: str) -> str:
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(torch.device(device))
    from deploykit.bench.machine import cpu_name

    return cpu_name()


def _rounded(obj):
    if isinstance(obj, float):
        return round(obj, 4)
    if isinstance(obj, dict):
        return {k: _rounded(v) for k, v in obj.items()}
    return obj
