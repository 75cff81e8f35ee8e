"""What an ONNX graph takes, and feeds made to match it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto

NUMPY_DTYPES = {TensorProto.FLOAT: np.float32, TensorProto.FLOAT16: np.float16, TensorProto.DOUBLE: np.float64,
                TensorProto.INT64: np.int64, TensorProto.INT32: np.int32, TensorProto.BOOL: np.bool_}

Signature = dict[str, tuple[type, list]]


def graph_signature(onnx_path: str | Path) -> Signature:
    """Input name -> (numpy dtype, shape with dim names for dynamic axes), in graph order."""
    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    return {i.name: (NUMPY_DTYPES[i.type.tensor_type.elem_type],
                     [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]) for i in graph.input}


def adapt_feed(feed: dict[str, np.ndarray], signature: Signature, notes: set[str] | None = None) -> dict[str, np.ndarray]:
    """``feed`` cast to the dtypes and ranks of a graph's inputs (``signature``: :func:`graph_signature`).

    A 0-d input (optimum's scalar timestep: one value for the batch) fed a batch of values takes the first;
    both sides of a comparison get the same feed, so the check stays like for like (``notes`` records it).
    """
    out = {}
    for name, (dtype, shape) in signature.items():
        if name not in feed:
            raise ValueError(f"input {name!r} is missing (the graph takes {list(signature)})")
        x = np.asarray(feed[name])
        if len(shape) == 0 and x.ndim == 1:
            if notes is not None and not np.all(x == x[0]):
                notes.add(f"{name} is a scalar in this graph: the first of each batch's values was used")
            x = x[0]
        elif len(shape) == 1 and x.ndim == 0:
            x = np.full((np.asarray(feed["sample"]).shape[0],), x) if "sample" in feed else x[None]
        out[name] = np.array(x, dtype=dtype, order="C")  # (np.ascontiguousarray would make a 0-d array 1-d)
    return out
