"""Builds started by ``accelerate launch`` / ``torchrun``: which process this is, and a barrier.

``deploykit build`` is one process. Started by a launcher with several processes, every process runs
the same command; the main process runs the build and the others join it only for the stages that
train data-parallel (``StageSpec.distributed``: distill), waiting at a barrier meanwhile.
"""

from __future__ import annotations

import os
from datetime import timedelta

# Followers wait at a barrier while the main process runs the stages before distill; pruning an
# SD-size UNet on a CPU takes a while, so the collective timeout is long.
BARRIER_TIMEOUT = timedelta(hours=24)


def launched() -> bool:
    """True under ``accelerate launch`` / ``torchrun`` with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def process_state():
    """accelerate's per-process state (rank, world size, device, barrier); joins the process group when launched.

    CPU processes (no CUDA device) talk over gloo, GPU processes over NCCL.
    """
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available(), timeout=BARRIER_TIMEOUT)
