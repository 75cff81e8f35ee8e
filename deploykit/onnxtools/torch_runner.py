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
                 name: str | None = None, float_dtype: torch.dtype | None = None):
        """``inputs`` maps each input name to its dtype and shape (a string names a dynamic axis); the module
        takes them positionally in that order. ``float_dtype``: floating inputs are cast to it (an fp16 feed
        for an fp32 module); outputs come back as numpy in the module's dtype."""
        super().__init__(name=name, prefix="torch-runner")
        self.module = module
        self.inputs = inputs
        self.input_names = list(inputs)
        self.output_names = output_names
        self.float_dtype = float_dtype

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
        if self.float_dtype is not None:
            args = [a.to(self.float_dtype) if a.is_floating_point() else a for a in args]
        start = time.perf_counter()
        out = self.module(*args)
        self.inference_time = time.perf_counter() - start
        outs = out if isinstance(out, (tuple, list)) else (out,)
        return OrderedDict((n, o.detach().cpu().numpy()) for n, o in zip(self.output_names, outs))

    def deactivate_impl(self):
        pass
