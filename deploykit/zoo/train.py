"""``deploykit zoo train NAME``: train a zoo teacher and its FID feature extractor from scratch.

Every setting lives in ``deploykit.zoo.registry`` and is written into the zoo card next to the
weights, so anyone can retrain and compare.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from deploykit.eval.features import DigitsClassifier
from deploykit.io import atomic_write_json, make_temp_dir, replace_dir, save_tensors
from deploykit.zoo.data import load_digits_images, split_indices
from deploykit.zoo.registry import ClassifierTraining, PipelineZooEntry, TeacherTraining, ZooEntry


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
        TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
    )


def _random_shift(images: torch.Tensor, max_shift: int, gen: torch.Generator) -> torch.Tensor:
    if max_shift == 0:
        return images
    padded = F.pad(images, [max_shift] * 4, value=-1.0)
    h, w = images.shape[-2:]
    dy, dx = torch.randint(0, 2 * max_shift + 1, (2,), generator=gen).tolist()
    return padded[..., dy:dy + h, dx:dx + w]


def train_classifier(images: torch.Tensor, labels: torch.Tensor, cfg: ClassifierTraining) -> tuple[DigitsClassifier, float]:
    """Train the FID feature extractor; returns the model and its held-out accuracy."""
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    train_idx, held_idx = split_indices(len(images), cfg.held_out, cfg.seed)
    model = DigitsClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=1e-4)
    steps_per_epoch = math.ceil(len(train_idx) / cfg.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.epochs * steps_per_epoch)
    for _ in range(cfg.epochs):
        model.train()
        perm = train_idx[torch.randperm(len(train_idx), generator=gen)]
        for i in range(0, len(perm), cfg.batch_size):
            idx = perm[i:i + cfg.batch_size]
            x = _random_shift(images[idx], cfg.max_shift, gen)
            loss = F.cross_entropy(model(x), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    with torch.no_grad():
        acc = (model(images[held_idx]).argmax(1) == labels[held_idx]).float().mean().item()
    return model, acc


def train_teacher(entry: ZooEntry, images: torch.Tensor, cfg: TeacherTraining, progress: Progress | None = None):
    """DDPM training (epsilon prediction) with linear warm-up, cosine decay and an EMA of the weights."""
    from diffusers import DDPMScheduler, UNet2DModel

    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    model = UNet2DModel(**entry.unet_config)
    ema = copy.deepcopy(model).requires_grad_(False)
    scheduler = DDPMScheduler(num_train_timesteps=cfg.num_train_timesteps, beta_schedule=cfg.beta_schedule)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)

    def lr_at(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        done = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * done)) * 0.95 + 0.05

    lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    task = progress.add_task("teacher", total=cfg.steps, info="") if progress else None
    losses: list[float] = []
    for step in range(cfg.steps):
        idx = torch.randint(0, len(images), (cfg.batch_size,), generator=gen)
        x0 = images[idx]
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, cfg.num_train_timesteps, (cfg.batch_size,), generator=gen)
        loss = F.mse_loss(model(scheduler.add_noise(x0, noise, t), t).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        lr_sched.step()
        with torch.no_grad():
            # A short run: warm the EMA up so early weights do not dominate it.
            decay = min(cfg.ema_decay, (1 + step) / (10 + step))
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - decay)
        losses.append(loss.item())
        if progress is not None:
            progress.update(task, advance=1, info=f"loss {sum(losses[-50:]) / len(losses[-50:]):.4f}")
    return ema.eval(), losses


def train_zoo_entry(entry: ZooEntry | PipelineZooEntry, out_dir: Path, steps: int | None = None,
                    device: str = "cpu") -> dict:
    """Train teacher and classifier; write weights, configs and the card into ``out_dir`` atomically."""
    if entry.kind != "pixel":
        from deploykit.zoo.train_pipeline import train_pipeline_entry

        with _progress() as progress:
            return train_pipeline_entry(entry, out_dir, steps, progress, device)
    if device != "cpu":
        raise ValueError(f"zoo:{entry.name} trains on the CPU only (a few minutes); --device {device} is for "
                         "text-to-image teachers")
    images, labels = load_digits_images(entry.resolution)
    teacher_cfg = entry.teacher if steps is None else TeacherTraining(**{**entry.settings()["teacher"], "steps": steps})
    started = time.time()
    with _progress() as progress:
        classifier, acc = train_classifier(images, labels, entry.classifier)
        teacher, losses = train_teacher(entry, images, teacher_cfg, progress)
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(out_dir.parent, f".{out_dir.name}.")
    try:
        # fp16 halves the shipped size; the loader casts back to fp32.
        save_tensors(tmp / "unet.safetensors", {k: v.half() for k, v in teacher.state_dict().items()})
        atomic_write_json(tmp / "unet_config.json", dict(teacher.config))
        save_tensors(tmp / "features.safetensors", classifier.state_dict())
        card = {
            "name": entry.name,
            "description": entry.description,
            "dataset": entry.dataset,
            "resolution": entry.resolution,
            "settings": {"teacher": teacher_cfg.__dict__, "classifier": entry.classifier.__dict__},
            "classifier_held_out_accuracy": round(acc, 4),
            "final_loss_mean_last_100": round(sum(losses[-100:]) / len(losses[-100:]), 5),
            "train_seconds": round(time.time() - started, 1),
            "torch": torch.__version__,
            "command": f"deploykit zoo train {entry.name}" + ("" if steps is None else f" --steps {steps}"),
        }
        atomic_write_json(tmp / "card.json", card)
        replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return card


if __name__ == "__main__":  # pragma: no cover - convenience for `python -m deploykit.zoo.train`
    import sys

    from deploykit.zoo.registry import get_entry

    name = sys.argv[1] if len(sys.argv) > 1 else "digits"
    e = get_entry(name)
    print(json.dumps(train_zoo_entry(e, e.folder), indent=2))
