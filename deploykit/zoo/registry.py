"""The zoo: teachers this project trains itself and ships as small safetensors files."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

WEIGHTS_DIR = Path(__file__).parent / "weights"


def weights_dir() -> Path:
    """Where zoo weights live: the package, or ``$DEPLOYKIT_ZOO_DIR`` (tests train tiny teachers there)."""
    return Path(os.environ["DEPLOYKIT_ZOO_DIR"]) if os.environ.get("DEPLOYKIT_ZOO_DIR") else WEIGHTS_DIR


@dataclass(frozen=True)
class TeacherTraining:
    """Settings of ``deploykit zoo train``; stored in the zoo card so a retrain is exact."""

    steps: int = 2500
    batch_size: int = 64
    lr: float = 1e-3
    warmup_steps: int = 100
    ema_decay: float = 0.995
    num_train_timesteps: int = 1000
    beta_schedule: str = "linear"
    seed: int = 0


@dataclass(frozen=True)
class ClassifierTraining:
    epochs: int = 30
    batch_size: int = 128
    lr: float = 2e-3
    held_out: float = 0.2
    max_shift: int = 1
    seed: int = 0


@dataclass(frozen=True)
class ZooEntry:
    name: str
    description: str
    dataset: str
    resolution: int
    unet_config: dict
    teacher: TeacherTraining = field(default_factory=TeacherTraining)
    classifier: ClassifierTraining = field(default_factory=ClassifierTraining)

    @property
    def folder(self) -> Path:
        return weights_dir() / self.name

    def settings(self) -> dict:
        return {"teacher": asdict(self.teacher), "classifier": asdict(self.classifier)}


# Sized so that a UNet call is compute-bound on a 2-core CPU (about 145 MMACs per image: convolutions
# dominate, so removing channels shows up in wall-clock time) while a 16x16 sample set for FID still
# takes under a minute. Attention at 8x8 as in DDPM's CIFAR-10 UNet; one head so that pruning the
# attention width never breaks a head split. GroupNorm with 8 groups keeps groups wide enough for
# channel rounding to 8.
DIGITS = ZooEntry(
    name="digits",
    description="pixel-space DDPM UNet2DModel on scikit-learn's handwritten digits, 16x16 grey",
    dataset="sklearn-digits",
    resolution=16,
    unet_config={
        "sample_size": 16,
        "in_channels": 1,
        "out_channels": 1,
        "layers_per_block": 1,
        "block_out_channels": [48, 96, 96],
        "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
        "norm_num_groups": 8,
        "attention_head_dim": None,
    },
)

# The same recipe at a size that trains in seconds: for tests, never shipped.
DIGITS_TINY = ZooEntry(
    name="digits-tiny",
    description="test-size digits DDPM (trains in seconds; not shipped)",
    dataset="sklearn-digits",
    resolution=16,
    unet_config={**DIGITS.unet_config, "block_out_channels": [16, 32, 32], "norm_num_groups": 4},
    teacher=TeacherTraining(steps=30, batch_size=16, warmup_steps=5),
    classifier=ClassifierTraining(epochs=2),
)

ZOO: dict[str, ZooEntry] = {e.name: e for e in (DIGITS, DIGITS_TINY)}


def get_entry(name: str) -> ZooEntry:
    try:
        return ZOO[name]
    except KeyError:
        known = ", ".join(sorted(ZOO))
        raise KeyError(f"no zoo teacher named {name!r} (known: {known})") from None
