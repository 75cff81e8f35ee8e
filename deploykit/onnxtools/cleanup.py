"""Graph clean-up for exported ONNX models: shape inference, constant folding, dead-node removal, sorting.

Everything here works on models over protobuf's 2 GB limit (the SD1.5 UNet is 3.4 GB in fp32) and
without holding the weights in memory twice:

- :class:`Weights` takes the large initializers out of a model, leaving a *skeleton* in which each of
  them is a graph input of the same name, type and shape. Passes run on the skeleton (a few MB):
  shape inference, constant folding (onnx-graphsurgeon, evaluated by ONNX Runtime; a weight is not a
  constant there, so nothing weight-sized is folded or serialised), the fp16 converter. The bytes stay
  where they were (in the exporter's files, or in memory for small models) until :meth:`Weights.save`
  streams them, one tensor at a time, into the final file;
- models over :data:`EXTERNAL_DATA_BYTES` of weights are saved with one ``<name>_data`` file beside the
  ``.onnx`` file (``model.onnx`` + ``model.onnx_data``), the layout optimum writes and loads.
"""

from __future__ import annotations

import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

# Above this many bytes of weights a model is saved with external data (protobuf refuses to serialise
# messages over 2 GiB; keep a margin for the graph itself).
EXTERNAL_DATA_BYTES = 1800 * 1024**2
# Initializers at or under this size stay in the graph: shape inputs (Reshape, Expand, ...) must stay
# readable to shape inference and constant folding, and are saved inside model.onnx.
INLINE_TENSOR_BYTES = 1024
# Constant folding never creates a tensor larger than this (it would only bloat the file).
FOLD_SIZE_THRESHOLD = 16 * 1024**2
_ALIGN = 4096  # offsets of large tensors in the data file, as onnx aligns them (page size, for mmap)


@dataclass
class _Source:
    data_type: int
    dims: tuple[int, ...]
    raw: bytes | None = None  # in memory
    file: Path | None = None  # or in a file
    offset: int = 0
    length: int = 0

    def read(self) -> bytes:
        if self.raw is not None:
            return self.raw
        with open(self.file, "rb") as f:
            f.seek(self.offset)
            return f.read(self.length)


def _external_info(t: TensorProto) -> dict[str, str]:
    return {e.key: e.value for e in t.external_data}


def _nbytes(t: TensorProto) -> int:
    if t.data_location == TensorProto.EXTERNAL:
        return int(_external_info(t).get("length", 0))
    if t.HasField("raw_data"):
        return len(t.raw_data)
    return int(np.prod(t.dims, dtype=np.int64)) * helper.tensor_dtype_to_np_dtype(t.data_type).itemsize


class Weights:
    """The large initializers of a model, kept out of its graph (see the module docstring)."""

    def __init__(self) -> None:
        self.sources: dict[str, _Source] = {}

    @classmethod
    def strip(cls, model: onnx.ModelProto, base_dir: str | Path | None = None,
              threshold: int = INLINE_TENSOR_BYTES) -> Weights:
        """Move every initializer over ``threshold`` bytes (and every external one) out of ``model`` (in place)
        into graph inputs; external data is read later from ``base_dir``, which must outlive the save."""
        weights = cls()
        keep = []
        for t in model.graph.initializer:
            external = t.data_location == TensorProto.EXTERNAL
            if not external and _nbytes(t) <= threshold:
                keep.append(t)
                continue
            if external:
                info = _external_info(t)
                file = Path(base_dir or ".") / info["location"]
                offset = int(info.get("offset", 0))
                length = int(info["length"]) if "length" in info else file.stat().st_size - offset
                src = _Source(t.data_type, tuple(t.dims), file=file, offset=offset, length=length)
            elif t.HasField("raw_data"):
                src = _Source(t.data_type, tuple(t.dims), raw=t.raw_data)
            else:
                src = _Source(t.data_type, tuple(t.dims), raw=numpy_helper.to_array(t).tobytes())
            weights.sources[t.name] = src
        inputs = [helper.make_tensor_value_info(name, s.data_type, list(s.dims)) for name, s in weights.sources.items()]
        del model.graph.initializer[:]
        model.graph.initializer.extend(keep)
        model.graph.input.extend(inputs)
        return weights

    def _tensor_bytes(self, name: str, data_type: int) -> bytes:
        """The weight's bytes in ``data_type`` (the skeleton's input type: the fp16 converter may have changed it)."""
        src = self.sources[name]
        raw = src.read()
        if data_type == src.data_type:
            return raw
        array = np.frombuffer(raw, dtype=helper.tensor_dtype_to_np_dtype(src.data_type))
        target = helper.tensor_dtype_to_np_dtype(data_type)
        if target == np.float16:
            # as ONNX Runtime's converter does: keep sign and finiteness, clamp into fp16's range
            limit = float(np.finfo(np.float16).max)
            array = np.clip(array, -limit, limit)
        return array.astype(target).tobytes()

    def _weight_inputs(self, model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
        return [i for i in model.graph.input if i.name in self.sources]

    def save(self, model: onnx.ModelProto, path: str | Path, external: bool | None = None) -> list[Path]:
        """Write the skeleton ``model`` with its weights to ``path`` (and ``<path>_data`` when ``external``,
        by default when the weights are large); weights no node reads any more are dropped.

        The skeleton is left unchanged. Not atomic on its own: write into a staging folder.
        Returns the files written, the ``.onnx`` file first.
        """
        path = Path(path)
        used = {x for node in model.graph.node for x in node.input} | {o.name for o in model.graph.output}
        weight_inputs = [i for i in self._weight_inputs(model) if i.name in used]
        if external is None:  # decided on the bytes as written (an fp16 skeleton halves fp32 sources)
            written = sum(int(np.prod([d.dim_value for d in vi.type.tensor_type.shape.dim], dtype=np.int64))
                          * helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type).itemsize for vi in weight_inputs)
            external = written + sum(_nbytes(t) for t in model.graph.initializer) > EXTERNAL_DATA_BYTES
        out = onnx.ModelProto()
        out.CopyFrom(model)
        graph_inputs = [i for i in out.graph.input if i.name not in self.sources]
        del out.graph.input[:]
        out.graph.input.extend(graph_inputs)
        data = path.with_name(data_file_name(path))
        files = [path]
        if external:
            files.append(data)
            with open(data, "wb") as f:
                for vi in weight_inputs:
                    raw = self._tensor_bytes(vi.name, vi.type.tensor_type.elem_type)
                    if len(raw) >= 1024**2 and f.tell() % _ALIGN:
                        f.write(b"\0" * (_ALIGN - f.tell() % _ALIGN))
                    t = self._initializer(vi)
                    t.data_location = TensorProto.EXTERNAL
                    for key, value in (("location", data.name), ("offset", str(f.tell())), ("length", str(len(raw)))):
                        entry = t.external_data.add()
                        entry.key, entry.value = key, value
                    f.write(raw)
                    out.graph.initializer.append(t)
        else:
            for vi in weight_inputs:
                t = self._initializer(vi)
                t.raw_data = self._tensor_bytes(vi.name, vi.type.tensor_type.elem_type)
                out.graph.initializer.append(t)
            if data.exists():
                data.unlink()
        onnx.save_model(out, str(path))
        return files

    @staticmethod
    def _initializer(vi: onnx.ValueInfoProto) -> TensorProto:
        t = TensorProto()
        t.name = vi.name
        t.data_type = vi.type.tensor_type.elem_type
        t.dims.extend(d.dim_value for d in vi.type.tensor_type.shape.dim)
        return t


def infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """ONNX shape inference on a model of any size; returns a new model with ``value_info`` filled in.

    On a skeleton this is cheap; a full model over the size limit is stripped for the call and restored.
    """
    if sum(_nbytes(t) for t in model.graph.initializer) < EXTERNAL_DATA_BYTES:
        return onnx.shape_inference.infer_shapes(model, check_type=False, strict_mode=False)
    weights = Weights.strip(model)
    inferred = onnx.shape_inference.infer_shapes(model, check_type=False, strict_mode=False)
    for m in (model, inferred):
        _put_back(m, weights)
    return inferred


def _put_back(model: onnx.ModelProto, weights: Weights) -> None:
    """Inverse of :meth:`Weights.strip` in memory (for models under the size limit, or briefly)."""
    inputs = {i.name: i for i in model.graph.input}
    for name in weights.sources:
        vi = inputs[name]
        t = Weights._initializer(vi)
        t.raw_data = weights._tensor_bytes(name, vi.type.tensor_type.elem_type)
        model.graph.initializer.append(t)
    kept = [i for i in model.graph.input if i.name not in weights.sources]
    del model.graph.input[:]
    model.graph.input.extend(kept)


def fold_constants(model: onnx.ModelProto, size_threshold: int = FOLD_SIZE_THRESHOLD) -> onnx.ModelProto:
    """Fold constant subgraphs (shape arithmetic, constant nodes), drop dead nodes, sort topologically.

    Unused graph inputs are kept (on a skeleton they are the weights).
    """
    import onnx_graphsurgeon as gs
    import onnxruntime as ort
    from polygraphy.logger import G_LOGGER

    # graphsurgeon evaluates the foldable part in ONNX Runtime sessions that warn about every
    # optimisation they skip; keep errors only while folding (2 = ONNX Runtime's default level).
    ort.set_default_logger_severity(3)
    try:
        with G_LOGGER.verbosity(G_LOGGER.CRITICAL):
            graph = gs.import_onnx(model)
            graph.fold_constants(size_threshold=size_threshold, error_ok=True)
            graph.cleanup(remove_unused_graph_inputs=False).toposort()
            out = gs.export_onnx(graph, do_type_check=False)
    finally:
        ort.set_default_logger_severity(2)
    out.ir_version = model.ir_version
    del out.metadata_props[:]
    out.metadata_props.extend(model.metadata_props)
    return out


def toposort(model: onnx.ModelProto) -> onnx.ModelProto:
    """Topologically sorted copy without dead nodes (editing passes append nodes at the end)."""
    import onnx_graphsurgeon as gs

    graph = gs.import_onnx(model)
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    out = gs.export_onnx(graph, do_type_check=False)
    out.ir_version = model.ir_version
    return out


def clean_model(model: onnx.ModelProto, fold: bool = True) -> onnx.ModelProto:
    """Shape inference, constant folding, clean-up and topological sort, then shape inference again."""
    model = infer_shapes(model)
    if fold:
        model = fold_constants(model)
        del model.graph.value_info[:]  # folding leaves value_info of removed tensors behind
        model = infer_shapes(model)
    return model


def data_file_name(path: str | Path) -> str:
    """Name of the external data file beside ``path`` (``model.onnx`` -> ``model.onnx_data``), as optimum names it."""
    return Path(path).name + "_data"


def check_model(path: str | Path) -> None:
    """onnx.checker on the file (path-based, so it works with external data over 2 GB)."""
    onnx.checker.check_model(str(path))


def load_skeleton(path: str | Path) -> tuple[onnx.ModelProto, Weights]:
    """A model file as skeleton and :class:`Weights` (reading nothing weight-sized yet)."""
    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    return model, Weights.strip(model, base_dir=path.parent)


def clean_file(path: str | Path, fold: bool = True) -> list[Path]:
    """Clean an ONNX file in place, external data included; the new files replace the old ones at the end
    (``model.onnx`` last, so an existing ``model.onnx`` always has its complete data beside it)."""
    path = Path(path)
    model, weights = load_skeleton(path)
    model = clean_model(model, fold=fold)
    staging = path.parent / f".{path.name}.clean-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        files = weights.save(model, staging / path.name)
        check_model(files[0])
        old_data = path.with_name(data_file_name(path))
        path.unlink()
        if old_data.exists() and len(files) == 1:
            old_data.unlink()
        for f in files[1:] + files[:1]:
            os.replace(f, path.parent / f.name)
        return [path.parent / f.name for f in files]
    finally:
        shutil.rmtree(staging, ignore_errors=True)
