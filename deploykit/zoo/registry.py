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
    kind = "pixel"
    eval_files = ("features.safetensors",)  # what the teacher stage copies into the artifact for eval

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

@dataclass(frozen=True)
class VaeTraining:
    """The AutoencoderKL, trained first: L1 reconstruction plus a small KL term (SD's VAE loss without its critic)."""

    images: int = 8000
    steps: int = 1200
    batch_size: int = 16
    lr: float = 1e-3
    warmup_steps: int = 50
    kl_weight: float = 1e-6
    foreground_weight: float = 10.0  # L1 weight of shape pixels against background ones
    seed: int = 1


@dataclass(frozen=True)
class PipelineTraining:
    """The text encoder and the UNet, trained jointly on the VAE's latents (the target the entry's scheduler names)."""

    images: int = 24000
    steps: int = 3000
    batch_size: int = 32
    lr: float = 1e-3
    warmup_steps: int = 200
    ema_decay: float = 0.999
    caption_dropout: float = 0.1   # the empty caption, so that classifier-free guidance works
    snr_gamma: float = 5.0         # Min-SNR-gamma loss weights (Hang et al. 2023); 0 turns them off
    # Share of each batch drawn from timesteps >= high_noise_from instead of uniformly. Below that, a small
    # bright shape still shows through the noise, so a model can read where it is from the noisy latent and
    # never learns it from the prompt; at sampling time the first steps see only noise.
    high_noise_share: float = 0.0
    high_noise_from: int = 850
    bf16: bool = False             # CPU autocast; off: fp32 throughout
    seed: int = 2


@dataclass(frozen=True)
class AttributeTraining:
    """The attribute classifier: its own images and seed, every combination (held-out pairs included)."""

    images: int = 7000
    held_out: float = 0.15
    epochs: int = 12
    batch_size: int = 128
    lr: float = 3e-3
    noise: float = 0.08  # augmentation: Gaussian pixel noise up to this std, so generated images read as well
    seed: int = 3


@dataclass(frozen=True)
class Sampling:
    """How the teacher's prompt accuracy is measured (and the shipped scheduler's defaults)."""

    scheduler: str = "ddim"
    steps: int = 25
    guidance_scale: float = 7.5
    prompts_per_split: int = 120  # trained and held-out combinations, each
    seed: int = 4


# SD1.5's noise schedule and DDIM settings (its scheduler_config, with DDIM in place of PNDM).
SD15_SCHEDULER = {"num_train_timesteps": 1000, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
                  "prediction_type": "epsilon", "steps_offset": 1, "clip_sample": False, "set_alpha_to_one": False,
                  "timestep_spacing": "leading"}


@dataclass(frozen=True)
class PipelineZooEntry:
    """A text-to-image teacher with SD1.5's component types, saved as a StableDiffusionPipeline folder."""

    name: str
    description: str
    dataset: str
    resolution: int
    unet_config: dict
    vae_config: dict
    text_config: dict
    vae: VaeTraining = field(default_factory=VaeTraining)
    teacher: PipelineTraining = field(default_factory=PipelineTraining)
    classifier: AttributeTraining = field(default_factory=AttributeTraining)
    sampling: Sampling = field(default_factory=Sampling)
    # the training noise schedule and the shipped DDIM's; a v_prediction schedule trains on the velocity
    scheduler: dict = field(default_factory=lambda: dict(SD15_SCHEDULER))
    kind = "sd"
    eval_files = ("attributes.safetensors", "fid_reference.safetensors")

    @property
    def folder(self) -> Path:
        return weights_dir() / self.name

    def settings(self) -> dict:
        return {"vae": asdict(self.vae), "teacher": asdict(self.teacher), "classifier": asdict(self.classifier),
                "sampling": asdict(self.sampling)}


# SD1.5's block types at a size where one UNet call at batch 2 (classifier-free guidance) takes tens of
# milliseconds on a 2-core CPU and is dominated by convolutions and attention projections, so removing
# channels shows up in wall-clock time. Latents 4x16x16 (64x64 images, VAE factor 4); cross-attention
# at 16x16 and 8x8 and in the mid block; 4 heads (diffusers' SD naming: attention_head_dim is the head
# count); GEGLU feed-forward (diffusers' default). 8 GroupNorm groups: a pruned width must stay a multiple
# of the group count, and with 16 the 64-channel blocks could only go 64 -> 48, overshooting a 0.5 MACs target.
#
# The noise schedule is DDPM's linear one with v-prediction, not SD1.5's: a small bright shape still shows
# through SD's noisiest sample (terminal SNR 0.005), so a teacher trained on it reads where the shape is from
# the noise and ignores "at the top left" (the shipped teacher before this one: position 23%, chance 20%;
# benchmarks/results/shapes_teacher_variants_*). Linear betas end at SNR 4e-5, and 30% of each batch is drawn
# from the noisiest 150 steps, where only the prompt says where the shape goes.
SHAPES = PipelineZooEntry(
    name="shapes",
    description="text-to-image SD pipeline (CLIP text encoder, AutoencoderKL, cross-attention UNet) on coloured shapes, 64x64",
    dataset="shapes",
    resolution=64,
    unet_config={
        "sample_size": 16, "in_channels": 4, "out_channels": 4, "layers_per_block": 1,
        "block_out_channels": [64, 128, 128],
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        "cross_attention_dim": 128, "attention_head_dim": 4, "norm_num_groups": 8,
    },
    vae_config={
        "block_out_channels": [16, 32, 64], "layers_per_block": 1, "latent_channels": 4,
        "down_block_types": ["DownEncoderBlock2D"] * 3, "up_block_types": ["UpDecoderBlock2D"] * 3,
        "norm_num_groups": 8, "sample_size": 64,
    },
    text_config={"hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 3, "num_attention_heads": 4,
                 "hidden_act": "quick_gelu", "projection_dim": 128},
    teacher=PipelineTraining(high_noise_share=0.3),
    scheduler={**SD15_SCHEDULER, "beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02,
               "prediction_type": "v_prediction"},
)

# The same pipeline at test size: trains in seconds, never shipped.
SHAPES_TINY = PipelineZooEntry(
    name="shapes-tiny",
    description="test-size shapes SD pipeline (trains in seconds; not shipped)",
    dataset="shapes",
    resolution=64,
    unet_config={**SHAPES.unet_config, "block_out_channels": [16, 32, 32], "cross_attention_dim": 32,
                 "attention_head_dim": 2, "norm_num_groups": 8},
    vae_config={**SHAPES.vae_config, "block_out_channels": [8, 16, 16], "norm_num_groups": 4},
    text_config={**SHAPES.text_config, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                 "num_attention_heads": 2, "projection_dim": 32},
    vae=VaeTraining(images=64, steps=3, batch_size=8),
    teacher=PipelineTraining(images=64, steps=4, batch_size=8, warmup_steps=1, high_noise_share=0.3),
    classifier=AttributeTraining(images=96, epochs=1, batch_size=32),
    sampling=Sampling(steps=2, prompts_per_split=2),
    scheduler=SHAPES.scheduler,
)

ZOO: dict[str, ZooEntry | PipelineZooEntry] = {e.name: e for e in (DIGITS, DIGITS_TINY, SHAPES, SHAPES_TINY)}


def get_entry(name: str) -> ZooEntry | PipelineZooEntry:
    try:
        return ZOO[name]
    except KeyError:
        known = ", ".join(sorted(ZOO))
        raise KeyError(f"no zoo teacher named {name!r} (known: {known})") from None
