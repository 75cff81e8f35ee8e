"""A polygraphy runner for a torch module, so torch takes part in polygraphy comparisons."""

from __future__ import annotations

import time
from collections import OrderedDict

import numpy as np
import torch
from polygraphy.backend.base import BaseRunner
from polygraphy.common import TensorMetadata


class TorchRunner(BaseRunner):
    def __init__(self, module: torch.nn.Module, inputs: dict[str, tuple[np.dtype, list]], output_names: list[str],
                 name: str | None = None):
        """``inputs`` maps each input name to its dtype and shape (a string names a dynamic axis)."""
        super().__init__(name=name, prefix="torch-runner")
        self.module = module
        self.inputs = inputs
        self.input_names = list(inputs)
        self.output_names = output_names

    def activate_impl(self):
        self.module.eval()

    def get_input_metadata_impl(self):
        meta = TensorMetadata()
        for name, (dtype, shape) in self.inputs.items():
            meta.add(name, dtype=dtype, shape=shape)
        return meta

    @torch.no_grad()
    def infer_impl(self, feed_dict):
        args = [torch.from_numpy(np.asarray(feed_dict[n])) for n in self.input_names]
        start = time.perf_counter()
        out = self.module(*args)
        self.inference_time = time.perf_counter() - start
        outs = out if isinstance(out, (tuple, list)) else (out,)
        return OrderedDict((n, o.detach().cpu().numpy()) for n, o in zip(self.output_names, outs))

    def deactivate_impl(self):
        pass
