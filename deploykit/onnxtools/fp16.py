"""fp16 conversion of an fp32 ONNX graph (a skeleton, see :mod:`deploykit.onnxtools.cleanup`).

- :func:`convert_fp16`: fp16 weights and compute with ONNX Runtime's float16 converter, except for named
  inputs whose path up to the first MatMul/Gemm/Conv stays fp32 (a UNet's sinusoidal timestep embedding:
  sin/cos of ``t * freq`` with t up to 1000 loses whole radians in fp16). The converter wraps each blocked
  node in casts, which would put an fp16 round trip between two blocked nodes; those round trips are removed.
- :func:`cast_io_fp16`: fp32 weights and compute, fp16 float inputs and outputs (the SDXL VAE, whose
  activations overflow fp16).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import onnx
from onnx import TensorProto

from deploykit.onnxtools import cleanup


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
