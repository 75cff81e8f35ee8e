"""Do the 2:4 masks survive export? Find each masked weight among an ONNX graph's initializers and check it.

Names are not a reliable key: the TorchScript exporter keeps ``NAME.weight`` for Conv and Gemm, but
a bias-free ``nn.Linear`` becomes a MatMul whose weight constant folding replaces with its transpose
under a generated name (``onnx::MatMul_1234``). So a weight is found by content: the initializer
that holds exactly the torch weight, or exactly its transpose, in the graph's precision (fp16 graphs
hold the weight rounded to fp16, which keeps every zero a zero). Where the direct form matches, the
groups of 4 run along axis 1 (Conv ``(C_out, C_in, kh, kw)``, Gemm ``(out, in)``); where the
transpose matches, along axis 0 (MatMul ``(in, out)``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from deploykit.sparsity.masks import _bad_groups

_NP = {1: np.float32, 10: np.float16, 11: np.float64, 16: None}  # onnx TensorProto data types; 16 = bfloat16 (unsupported)


@dataclass
class OnnxSparsityCheck:
    path: str
    layers: int                                               # masked layers looked for
    compliant: int                                            # found and 2:4 along the input channels
    not_found: list[str] = field(default_factory=list)        # no initializer holds the weight
    violations: list[dict] = field(default_factory=list)      # found, but a group of 4 keeps more than 2

    @property
    def passed(self) -> bool:
        return not self.not_found and not self.violations

    def as_dict(self) -> dict:
        return {**asdict(self), "passed": self.passed}

    def message(self) -> str:
        if self.passed:
            return f"{self.path}: all {self.layers} masked weights are 2:4"
        parts = [f"{v['layer']} ({v['bad_groups']} of {v['groups']} groups keep more than 2)" for v in self.violations[:3]]
        parts += [f"{name} (not in the graph)" for name in self.not_found[:3]]
        return (f"{self.path}: {len(self.violations)} masked weight(s) not 2:4 and {len(self.not_found)} not found "
                f"among {self.layers}: " + "; ".join(parts))


def _key(array: np.ndarray) -> tuple:
    array = np.ascontiguousarray(array)
    return array.shape, array.dtype.str, hashlib.sha256(array.tobytes()).hexdigest()


def _initializers(path: Path) -> dict[tuple, str]:
    """Content key -> initializer name, for every float initializer of rank 2 or 4 (external data loaded)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path), load_external_data=True)
    table = {}
    for init in model.graph.initializer:
        if len(init.dims) in (2, 4) and _NP.get(init.data_type) is not None:
            table[_key(numpy_helper.to_array(init))] = init.name
    return table


def check_onnx_2to4(onnx_path: str | Path, weights: Mapping[str, torch.Tensor],
                    names: Iterable[str] | None = None) -> OnnxSparsityCheck:
    """Check that the weights of ``names`` (module names; default: all of ``weights``) are 2:4 in the graph.

    ``weights`` maps module names to the torch weights the graph was exported from (a masked
    student's ``NAME.weight``); fp16 graphs are matched against the weights rounded to fp16.
    """
    path = Path(onnx_path)
    table = _initializers(path)
    names = list(weights if names is None else names)
    result = OnnxSparsityCheck(str(path), layers=len(names), compliant=0)
    for name in names:
        w = weights[name].detach().cpu()
        found = None
        for dtype in (np.float32, np.float16):
            direct = w.numpy().astype(dtype)
            if (hit := table.get(_key(direct))) is not None:
                found = (hit, direct, 1)
                break
            if w.dim() == 2 and (hit := table.get(_key(direct.T))) is not None:
                found = (hit, direct.T, 0)
                break
        if found is None:
            result.not_found.append(name)
            continue
        initializer, array, axis = found
        # back to torch's (out, in, ...) layout, where the masks' own check counts groups of 4 along dim 1
        bad, groups = _bad_groups(torch.from_numpy(np.ascontiguousarray(array if axis == 1 else array.T)))
        if bad:
            result.violations.append({"layer": name, "initializer": initializer, "bad_groups": bad, "groups": groups})
        else:
            result.compliant += 1
    return result
