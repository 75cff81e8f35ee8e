"""The ranges of a recipe's numbers, named once and shared by the stages' settings.

Every number has an upper bound a real machine can meet, so that a typo (or a hostile recipe) is an
error on load, not hours of work or an exhausted machine. Products of numbers (batch x resolution,
samples x resolution) are checked before a build starts, against this machine's memory
(:mod:`deploykit.stages.footprint`). See docs/recipes.md.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

# torch.Generator().manual_seed takes < 2**64, and the stages derive seeds from the recipe's: seed + sample
# index (eval, distill, quantize) and, per training step, seed * 1_000_003 + step (distill). 2**32 - 1 keeps
# all of them in range (and is the range numpy's legacy seeding takes).
SEED_MAX = 2**32 - 1
Seed = Annotated[int, Field(ge=0, le=SEED_MAX)]

# images per UNet call; 4096 digits-sized samples are a few MB, an SD batch that size is caught by the memory check
BATCH_MAX = 4096
BatchSize = Annotated[int, Field(ge=1, le=BATCH_MAX)]
# image side in pixels: SDXL's 1024 four times over
SIDE_MAX = 4096
Side = Annotated[int, Field(ge=8, le=SIDE_MAX)]

# a sampler never takes more steps than a training schedule has timesteps (DDPM's T = 1000)
SamplingSteps = Annotated[int, Field(ge=1, le=1000)]
TRAINING_STEPS_MAX = 10_000_000
TrainingSteps = Annotated[int, Field(ge=1, le=TRAINING_STEPS_MAX)]
# steps before something starts within a training run (0: at once)
StepCount = Annotated[int, Field(ge=0, le=TRAINING_STEPS_MAX)]
Samples = Annotated[int, Field(ge=1, le=1_000_000)]
Batches = Annotated[int, Field(ge=1, le=1000)]

# timing: pairs of calls (teacher, student)
Warmup = Annotated[int, Field(ge=0, le=100_000)]
Runs = Annotated[int, Field(ge=3, le=100_000)]

# a comparison's tolerance: above 1 (on outputs of unit scale) it would pass anything
Tolerance = Annotated[float, Field(gt=0, le=1)]
# a loss term's weight (0 turns it off)
LossWeight = Annotated[float, Field(ge=0, le=1000)]

# an optimization profile's (min, opt, max), ordered by the engine / bundle validators
ProfileBatch = tuple[BatchSize, BatchSize, BatchSize]
ProfileSide = tuple[Side, Side, Side]
