"""Export diffusers UNets (and any tensor-in, tensor-out module) to ONNX; check them against torch with polygraphy.

Files are written the way optimum writes them: ``model.onnx``, plus one ``model.onnx_data`` beside it
when the weights as written pass ~1.8 GB (protobuf's 2 GB limit; the SD1.5 UNet is 3.4 GB in fp32).
The file set appears at once: it is built in a staging folder and published by renaming (see
:func:`staged_folder`). Weights are never held twice: passes run on a skeleton graph and the weights
are streamed from the exporter's files into the final file (see ``export.cleanup``).

Precision (``fp16=True``): the graph is exported in fp32, cleaned, then converted with ONNX Runtime's
float16 converter (weights and compute fp16, float inputs and outputs fp16), except:

- a UNet's timestep path (from ``timestep`` / ``time_ids`` up to the first MatMul/Gemm/Conv: the
  sinusoidal projections) stays fp32, and so do those two inputs: sin/cos of ``t * freq`` with t up to
  1000 loses whole radians in fp16. (The converter wraps each blocked node in casts, which would put an
  fp16 round trip between two blocked nodes; those round trips are removed.)
- ``fp16="io"`` keeps all compute and weights fp32 and only makes the float inputs/outputs fp16 (used
  for the VAE, whose activations overflow fp16 in SDXL).

ONNX Runtime's CPU provider has few fp16 kernels: it runs fp16 graphs by inserting casts, correctly but
slower than fp32. fp16 graphs are for GPUs and TensorRT.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto
from torch import nn

from deploykit.export import cleanup
from deploykit.models.inputs import is_conditional, unet_input_names, unet_of
from deploykit.models.wrappers import TensorOutput

OUTPUT_NAMES = ("out_sample",)
# UNet inputs whose path to the time embedding stays fp32 in fp16 graphs (and which stay fp32 inputs)
FP32_TIME_INPUTS = ("timestep", "time_ids")
_NUMPY = {TensorProto.FLOAT: np.float32, TensorProto.FLOAT16: np.float16, TensorProto.DOUBLE: np.float64,
          TensorProto.INT64: np.int64, TensorProto.INT32: np.int32, TensorProto.BOOL: np.bool_}


# ----------------------------------------------------------------------------------------------
# staging and publishing


@contextlib.contextmanager
def staged_folder(dest: str | Path) -> Iterator[Path]:
    """Yield an empty staging folder; on success its files appear in ``dest``, on failure nothing does.

    When ``dest`` is absent or empty the staging folder (a hidden sibling) is renamed onto it: one atomic
    step. When ``dest`` already holds other files, the staged files are moved in one by one, ``*.onnx``
    last (an old ``*.onnx`` of the same name is removed first), so a ``model.onnx`` that exists always
    has its complete ``model.onnx_data`` beside it.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    whole = not dest.exists() or (dest.is_dir() and not any(dest.iterdir()))
    staging = (dest.parent / f".{dest.name}.tmp-{uuid.uuid4().hex[:8]}" if whole
               else dest / f".tmp-{uuid.uuid4().hex[:8]}")
    staging.mkdir()
    try:
        yield staging
        if whole:
            os.replace(staging, dest)  # rename(2) replaces an empty directory
            return
        files = sorted(staging.iterdir(), key=lambda f: f.suffix == ".onnx")
        staged = {f.name for f in files}
        for f in files:
            if f.suffix == ".onnx":
                # the earlier model goes first, and with it a data file the new one does not replace
                for old in (dest / f.name, dest / cleanup.data_file_name(f)):
                    if old.exists() and (old.name == f.name or old.name not in staged):
                        old.unlink()
        for f in files:
            if (dest / f.name).is_dir():
                shutil.rmtree(dest / f.name)
            os.replace(f, dest / f.name)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


# ----------------------------------------------------------------------------------------------
# export


def export_graph(module: nn.Module, args: Sequence[torch.Tensor], input_names: Sequence[str],
                 output_names: Sequence[str], dynamic_axes: dict, opset: int,
                 workdir: Path) -> tuple[onnx.ModelProto, cleanup.Weights]:
    """torch.onnx (TorchScript exporter) into ``workdir``; returns the graph as skeleton and its weights.

    The weights of a large model stay in the exporter's files under ``workdir`` until saved: keep
    ``workdir`` until :func:`write_model` has run.
    """
    raw = workdir / f"raw-{uuid.uuid4().hex[:8]}"
    raw.mkdir(parents=True)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        # The TorchScript exporter handles diffusers' data-dependent Python (timestep broadcasting,
        # shape-dependent upsampling) without graph breaks and matches torch to ~1e-6. Over 2 GB it
        # writes one file per weight into raw/; they are copied into one data file at the end.
        torch.onnx.export(module.eval(), tuple(args), str(raw / "model.onnx"), input_names=list(input_names),
                          output_names=list(output_names), dynamic_axes=dynamic_axes, opset_version=opset,
                          do_constant_folding=True, dynamo=False)
    return cleanup.load_skeleton(raw / "model.onnx")


def finish_model(model: onnx.ModelProto, weights: cleanup.Weights, fp16: bool | str = False, clean: bool = True,
                 fp32_inputs: Sequence[str] = ()) -> onnx.ModelProto:
    """Clean-up and precision conversion of an exported skeleton (see the module docstring)."""
    model = cleanup.clean_model(model, fold=clean)
    if fp16 == "io":
        model = cast_io_fp16(model, skip=set(weights.sources))
    elif fp16:
        model = convert_fp16(model, fp32_inputs=fp32_inputs)
    return model


def write_model(model: onnx.ModelProto, weights: cleanup.Weights, folder: Path, name: str = "model.onnx") -> list[Path]:
    """Save into ``folder`` (a staging folder) and check the file; returns the files written."""
    files = weights.save(model, folder / name)
    cleanup.check_model(files[0])
    return files


def export_module(module: nn.Module, args: Sequence[torch.Tensor], path: str | Path, input_names: Sequence[str],
                  output_names: Sequence[str], dynamic_axes: dict, opset: int = 17, fp16: bool | str = False,
                  clean: bool = True, fp32_inputs: Sequence[str] = ()) -> list[Path]:
    """Export ``module`` to ``path`` (plus ``<path>_data`` when large); the files appear only once complete."""
    path = Path(path)
    with staged_folder(path.parent) as staging:
        work = staging / ".work"
        model, weights = export_graph(module, args, input_names, output_names, dynamic_axes, opset, work)
        model = finish_model(model, weights, fp16=fp16, clean=clean, fp32_inputs=fp32_inputs)
        files = write_model(model, weights, staging, path.name)
        shutil.rmtree(work)
        names = [f.name for f in files]
    return [path.parent / n for n in names]


def unet_export_spec(model: nn.Module, example_inputs: Sequence[torch.Tensor]):
    """Input names, prepared example inputs and dynamic axes for a UNet, in optimum's naming.

    ``sample``: batch, height, width dynamic; ``encoder_hidden_states``: batch and sequence;
    ``text_embeds`` / ``time_ids``: batch. The timestep takes the example's form: a 0-d example gives a
    scalar input (optimum's layout: one timestep for the whole batch), a 1-d one a ``batch`` axis. Its
    dtype is float32 for text-conditioned UNets (what optimum exports and what schedulers such as
    Euler produce) and int64 for pixel UNets (UNet2DModel, as before).
    """
    names = unet_input_names(model)
    if len(example_inputs) != len(names):
        raise ValueError(f"{type(unet_of(model)).__name__} takes {len(names)} inputs {names}, got {len(example_inputs)}")
    args = list(example_inputs)
    conditional = is_conditional(model)
    args[1] = torch.as_tensor(args[1]).to(torch.float32 if conditional else torch.int64)
    if args[1].dim() > 1:
        raise ValueError(f"timestep must be 0-d or 1-d, got shape {tuple(args[1].shape)}")
    axes = {"sample": {0: "batch", 2: "height", 3: "width"}, "out_sample": {0: "batch", 2: "height", 3: "width"}}
    if args[1].dim() == 1:
        axes["timestep"] = {0: "batch"}
    if conditional:
        axes["encoder_hidden_states"] = {0: "batch", 1: "sequence"}
        for name in names[3:]:
            axes[name] = {0: "batch"}
    return names, [a.float() if a.is_floating_point() else a for a in args], axes


def export_unet(model: nn.Module, path: str | Path, example_inputs: Sequence[torch.Tensor], opset: int = 17,
                fp16: bool = False, clean: bool = True) -> Path:
    """Write a UNet (UNet2DModel or UNet2DConditionModel, SD or SDXL) as ONNX at ``path``.

    Inputs are named by :func:`deploykit.models.inputs.unet_input_names` and fed positionally in that
    order; the output is ``out_sample`` (see :func:`unet_export_spec` for axes and dtypes). Large models
    get ``<path>_data`` beside ``path``. Returns ``path``; it appears only once complete.
    """
    names, args, axes = unet_export_spec(model, example_inputs)
    export_module(TensorOutput(unet_of(model)).eval(), args, path, names, OUTPUT_NAMES, axes, opset=opset,
                  fp16=fp16, clean=clean, fp32_inputs=[n for n in FP32_TIME_INPUTS if n in names])
    return Path(path)


# ----------------------------------------------------------------------------------------------
# precision


def _consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    out: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            out.setdefault(name, []).append(node)
    return out


def _time_path_nodes(graph: onnx.GraphProto, inputs: Sequence[str], stop_ops=("MatMul", "Gemm", "Conv")) -> set[str]:
    """Names of nodes reachable from ``inputs`` without passing through a ``stop_ops`` node."""
    consumers = _consumers(graph)
    seen: set[str] = set()
    frontier = list(inputs)
    while frontier:
        for node in consumers.get(frontier.pop(), []):
            if node.op_type in stop_ops or node.name in seen:
                continue
            seen.add(node.name)
            frontier.extend(node.output)
    return seen


def _name_nodes(graph: onnx.GraphProto) -> None:
    used = {n.name for n in graph.node if n.name}
    for i, node in enumerate(graph.node):
        if not node.name:
            node.name = f"{node.op_type}_{i}"
            while node.name in used:
                node.name += "_"
            used.add(node.name)


def convert_fp16(model: onnx.ModelProto, fp32_inputs: Sequence[str] = ()) -> onnx.ModelProto:
    """fp16 weights and compute; float I/O fp16 except ``fp32_inputs``, whose downstream path up to the
    first MatMul/Gemm/Conv also stays fp32 (the timestep embedding)."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    _name_nodes(model.graph)
    present = [i.name for i in model.graph.input if i.name in fp32_inputs]
    blocked = _time_path_nodes(model.graph, present)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = convert_float_to_float16(model, keep_io_types=False, disable_shape_infer=True,
                                         node_block_list=sorted(blocked))
    _drop_cast_round_trips(model.graph)
    for name in present:
        _restore_fp32_input(model.graph, name)
    model = cleanup.toposort(model)
    del model.graph.value_info[:]
    return cleanup.infer_shapes(model)


def _drop_cast_round_trips(graph: onnx.GraphProto) -> None:
    """The converter wraps every blocked node in casts, so two blocked nodes in a row talk through an
    fp32 -> fp16 -> fp32 round trip that loses what blocking them was for; wire them directly."""
    producers = {out: node for node in graph.node for out in node.output}
    graph_outputs = {o.name for o in graph.output}
    rename: dict[str, str] = {}
    dropped = []
    for node in graph.node:
        if node.op_type != "Cast" or node.attribute[0].i != TensorProto.FLOAT or node.output[0] in graph_outputs:
            continue
        first = producers.get(node.input[0])
        if (first is not None and first.op_type == "Cast" and first.attribute[0].i == TensorProto.FLOAT16
                and first.name.endswith("_cast_to_fp16_node")):  # the converter's cast after a blocked (fp32) node
            rename[node.output[0]] = first.input[0]
            dropped.append(node)
    for node in dropped:
        graph.node.remove(node)
    for node in graph.node:
        for i, x in enumerate(node.input):
            if x in rename:
                node.input[i] = rename[x]


def _restore_fp32_input(graph: onnx.GraphProto, name: str) -> None:
    """The converter made input ``name`` fp16 and cast it back to fp32 for blocked consumers: undo the round trip."""
    graph_input = next(i for i in graph.input if i.name == name)
    if graph_input.type.tensor_type.elem_type != TensorProto.FLOAT16:
        return
    graph_input.type.tensor_type.elem_type = TensorProto.FLOAT
    fp16_name = f"{name}_as_fp16"
    needs_fp16 = False
    for node in list(graph.node):
        if name not in node.input:
            continue
        if node.op_type == "Cast" and node.attribute[0].i == TensorProto.FLOAT:
            # a Cast back to fp32: its consumers read the fp32 input directly
            for other in graph.node:
                for i, x in enumerate(other.input):
                    if x == node.output[0]:
                        other.input[i] = name
            graph.node.remove(node)
        else:
            for i, x in enumerate(node.input):
                if x == name:
                    node.input[i] = fp16_name
                    needs_fp16 = True
    if needs_fp16:
        graph.node.append(onnx.helper.make_node("Cast", [name], [fp16_name], to=TensorProto.FLOAT16,
                                                name=f"{name}_cast_to_fp16_input"))


def cast_io_fp16(model: onnx.ModelProto, skip: set[str] = frozenset()) -> onnx.ModelProto:
    """fp16 float inputs and outputs around an fp32 graph (Casts at the edges; weights and compute stay fp32).
    ``skip``: inputs left alone (a skeleton's weights)."""
    graph = model.graph
    for graph_input in graph.input:
        if graph_input.type.tensor_type.elem_type != TensorProto.FLOAT or graph_input.name in skip:
            continue
        inner = f"{graph_input.name}_fp32"
        for node in graph.node:
            for i, x in enumerate(node.input):
                if x == graph_input.name:
                    node.input[i] = inner
        graph_input.type.tensor_type.elem_type = TensorProto.FLOAT16
        graph.node.insert(0, onnx.helper.make_node("Cast", [graph_input.name], [inner], to=TensorProto.FLOAT,
                                                   name=f"{graph_input.name}_cast_to_fp32_input"))
    for graph_output in graph.output:
        if graph_output.type.tensor_type.elem_type != TensorProto.FLOAT:
            continue
        inner = f"{graph_output.name}_fp32"
        for node in graph.node:
            for i, x in enumerate(node.output):
                if x == graph_output.name:
                    node.output[i] = inner
            for i, x in enumerate(node.input):
                if x == graph_output.name:
                    node.input[i] = inner
        graph_output.type.tensor_type.elem_type = TensorProto.FLOAT16
        graph.node.append(onnx.helper.make_node("Cast", [inner], [graph_output.name], to=TensorProto.FLOAT16,
                                                name=f"{graph_output.name}_cast_to_fp16_output"))
    del graph.value_info[:]
    return cleanup.infer_shapes(model)


# ----------------------------------------------------------------------------------------------
# checks


def graph_signature(onnx_path: str | Path) -> dict[str, tuple[type, list]]:
    """Input name -> (numpy dtype, shape with dim names for dynamic axes), in graph order."""
    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    return {i.name: (_NUMPY[i.type.tensor_type.elem_type],
                     [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]) for i in graph.input}


def _adapt_feed(feed: dict[str, np.ndarray], signature: dict, notes: set[str] | None = None) -> dict[str, np.ndarray]:
    """Cast each array to the graph's dtype and rank. A 0-d input (optimum's scalar timestep: one value
    for the batch) fed a batch of values takes the first; both sides of a comparison get the same feed,
    so the check stays like for like (``notes`` records it)."""
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


def adapt_feed(feed: dict[str, np.ndarray], signature: dict) -> dict[str, np.ndarray]:
    """``feed`` cast to the dtypes and ranks of a graph's inputs (``signature``: :func:`graph_signature`)."""
    return _adapt_feed(feed, signature)


def compare_runners(runners: list, inputs: list[dict[str, np.ndarray]], atol: float, rtol: float) -> dict:
    """Polygraphy comparison of two runners; the worst output (largest max |diff|) is named in ``message``.

    Returns ``{"passed", "max_abs_error", "max_rel_error", "worst_output", "outputs", "message", "atol",
    "rtol", "iterations"}``, ``outputs`` holding per-output ``max_abs_error`` / ``max_rel_error`` / ``passed``.
    The relative error is taken against the first runner (the reference).
    """
    from polygraphy.comparator import Comparator, SimpleCompareFunc
    from polygraphy.logger import G_LOGGER

    with G_LOGGER.verbosity(G_LOGGER.CRITICAL):
        results = Comparator.run(runners, data_loader=inputs)
        accuracy = Comparator.compare_accuracy(results, compare_func=SimpleCompareFunc(atol=atol, rtol=rtol))
    (_, ref_iters), (_, test_iters) = results[0], results[1]
    per_output: dict[str, dict] = {}
    for it, (a, b) in enumerate(zip(ref_iters, test_iters)):
        for name in a.keys():
            x = np.asarray(a[name], dtype=np.float64)
            y = np.asarray(b[name], dtype=np.float64)
            diff = np.abs(x - y)
            finite = bool(np.isfinite(y).all())
            abs_err = float(diff.max()) if diff.size else 0.0
            rel_err = float((diff / (np.abs(x) + 1e-6)).max()) if diff.size else 0.0
            if not finite:
                abs_err = rel_err = float("inf")
            ok = bool(finite and np.all((diff <= atol) | (diff <= rtol * np.abs(x))))
            entry = per_output.setdefault(name, {"max_abs_error": 0.0, "max_rel_error": 0.0, "passed": True,
                                                 "worst_iteration": 0})
            if abs_err > entry["max_abs_error"]:
                entry["max_abs_error"], entry["worst_iteration"] = abs_err, it
            entry["max_rel_error"] = max(entry["max_rel_error"], rel_err)
            entry["passed"] = entry["passed"] and ok
    passed = bool(accuracy) and all(e["passed"] for e in per_output.values())
    worst = max(per_output, key=lambda n: (not per_output[n]["passed"], per_output[n]["max_abs_error"]))
    w = per_output[worst]
    message = (f"{'passed' if passed else 'FAILED'}: worst output {worst!r} max |diff| {w['max_abs_error']:.3g}, "
               f"max rel {w['max_rel_error']:.3g} (iteration {w['worst_iteration']}; atol {atol:g}, rtol {rtol:g}; "
               f"{runners[0].name} vs {runners[1].name})")
    return {"passed": passed, "max_abs_error": max(e["max_abs_error"] for e in per_output.values()),
            "max_rel_error": max(e["max_rel_error"] for e in per_output.values()), "worst_output": worst,
            "outputs": per_output, "message": message, "atol": atol, "rtol": rtol, "iterations": len(inputs)}


def ort_session(onnx_path: str | Path, threads: int | None = None):
    """An ONNX Runtime CPU session for checks: logs errors only (its optimisers warn a lot on diffusers
    graphs) and does not spin idle threads. Not for latency measurements."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    # idle ONNX Runtime threads spin by default, which starves torch running beside it in a comparison
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])


def _ort_runner(onnx_path: str | Path, name: str | None = None):
    from polygraphy.backend.onnxrt import OnnxrtRunner

    return OnnxrtRunner(ort_session(onnx_path), name=name)


def compare_module(module: nn.Module, onnx_path: str | Path, inputs: list[dict[str, np.ndarray]], atol: float,
                   rtol: float, output_names: Sequence[str] | None = None) -> dict:
    """torch ``module`` (positional inputs in the graph's input order) vs the ONNX file in ONNX Runtime."""
    from deploykit.export.torch_runner import TorchRunner

    signature = graph_signature(onnx_path)
    if output_names is None:
        graph = onnx.load(str(onnx_path), load_external_data=False).graph
        output_names = [o.name for o in graph.output]
    dtype = next((p.dtype for p in module.parameters()), torch.float32)
    notes: set[str] = set()
    feeds = [_adapt_feed(f, signature, notes) for f in inputs]
    runners = [TorchRunner(module.eval(), signature, list(output_names), float_dtype=dtype),
               _ort_runner(onnx_path)]
    return {**compare_runners(runners, feeds, atol, rtol), "notes": sorted(notes)}


def compare_with_torch(model: nn.Module, onnx_path: str | Path, inputs: list[dict[str, np.ndarray]],
                       atol: float, rtol: float) -> dict:
    """Run a torch UNet and its ONNX export on the same inputs through polygraphy's Comparator.

    Works for UNet2DModel (``sample``, ``timestep``) and SD / SDXL UNet2DConditionModel (plus
    ``encoder_hidden_states``, ``text_embeds``, ``time_ids``); each input dict is cast to the graph's
    dtypes (an fp16 graph is compared against the fp32 torch model) and ranks (a scalar-timestep graph
    takes each batch's first timestep, for torch too; see ``notes``). Returns ``{"passed",
    "max_abs_error", "max_rel_error", "worst_output", "message", "notes", "atol", "rtol", "iterations", ...}``.
    """
    names = list(unet_input_names(model))
    signature = graph_signature(onnx_path)
    if list(signature) != names:
        raise ValueError(f"{onnx_path} takes inputs {list(signature)}, the model {names}")
    return compare_module(TensorOutput(unet_of(model)).eval(), onnx_path, inputs, atol, rtol, OUTPUT_NAMES)


def compare_onnx(reference_path: str | Path, onnx_path: str | Path, inputs: list[dict[str, np.ndarray]],
                 atol: float, rtol: float) -> dict:
    """Two ONNX files with the same inputs and outputs (fp32 reference vs fp16, say) in ONNX Runtime CPU."""
    from polygraphy.backend.base import BaseRunner

    ref_sig, sig = graph_signature(reference_path), graph_signature(onnx_path)

    class _Casting(BaseRunner):  # feeds each runner its own dtypes
        def __init__(self, inner, signature):
            super().__init__(name=inner.name, prefix="casting")
            self.inner, self.signature = inner, signature

        def activate_impl(self):
            self.inner.activate()

        def get_input_metadata_impl(self):
            return self.inner.get_input_metadata(use_numpy_dtypes=False)

        def infer(self, feed_dict, check_inputs=True, *args, **kwargs):
            return super().infer(feed_dict, False, *args, **kwargs)

        def infer_impl(self, feed_dict):
            out = self.inner.infer(_adapt_feed(feed_dict, self.signature), check_inputs=False)
            self.inference_time = self.inner.inference_time
            return out

        def deactivate_impl(self):
            self.inner.deactivate()

    runners = [_Casting(_ort_runner(reference_path, "reference"), ref_sig), _Casting(_ort_runner(onnx_path, "onnx"), sig)]
    notes: set[str] = set()
    feeds = [_adapt_feed(f, ref_sig, notes) for f in inputs]
    return {**compare_runners(runners, feeds, atol, rtol), "notes": sorted(notes)}
