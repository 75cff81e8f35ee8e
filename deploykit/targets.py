"""The machines a recipe builds for (``target:``), known to the recipe and to the stages that depend on it."""

from __future__ import annotations

from typing import Literal

Target = Literal["cpu", "cuda", "jetson-agx-orin", "jetson-orin-nano"]
# Jetson targets: TensorRT on JetPack. Engines must be built on the device itself, so a Jetson recipe
# ends in a bundle stage and is timed on the device with `deploykit bench ARTIFACT --host user@jetson`.
# The names are those of deploykit.bench.roofline's devices (jetson-agx-orin-64gb, jetson-orin-nano-8gb)
# without the memory size.
JETSON_TARGETS = ("jetson-agx-orin", "jetson-orin-nano")
# What a Jetson recipe's messages tell the user to run instead of timing on this machine.
ON_DEVICE = "`deploykit bench ARTIFACT --host user@jetson` builds the engines on the {target} and times them there"
