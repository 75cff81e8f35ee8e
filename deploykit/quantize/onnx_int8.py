"""INT8 for ONNX Runtime on CPU: static post-training quantization into a QDQ graph.

``quantize_onnx(src, dst, batches, OrtInt8Config())`` runs ONNX Runtime's ``quantize_static`` with
``QuantFormat.QDQ``: every quantized Conv / MatMul / Gemm reads its activation through a
QuantizeLinear -> DequantizeLinear pair (ranges calibrated on ``batches``, the teacher's sampling
trajectories, see :mod:`deploykit.quantize.calibration`) and its weight through a DequantizeLinear of
an int8 initializer (per output channel by default). ONNX Runtime fuses each DQ -> op -> Q pattern into
an integer kernel when the session is created (QLinearConv, MatMulInteger, ...).

What stays float:

- nodes of excluded modules (:data:`deploykit.quantize.exclude.DEFAULT_EXCLUDE`: time embedding,
  conv_in / conv_out, shortcuts, norm_out), mapped from module patterns to node names;
- MatMuls with no constant input: attention's Q·K^T and attention·V. Both operands are activations,
  the products are small next to the projections, and softmax outputs quantized to 8 bits cost more
  quality than they save time (modelopt's INT8 SmoothQuant recipe leaves them float too);
- everything that is not Conv / MatMul / Gemm: adds, norms, activations, softmax (an int8 Add between
  two float ops only adds Q/DQ work on CPU).

Not run: ONNX Runtime's ``quant_pre_process``. Its optimisation pass fuses nodes under new names, which
would break the mapping from module patterns to node names; ONNX Runtime applies the same fusions to the
QDQ graph when it loads it, and ``quantize_static`` runs shape inference itself.

Activations default to uint8 (asymmetric: SiLU outputs are mostly positive, a zero point keeps their
range) with int8 symmetric weights, the U8S8 pair ONNX Runtime's x86 kernels are fastest with. On CPUs
without VNNI (AVX2 only) U8S8 can saturate in VPMADDUBSW; ``reduce_range=True`` (7-bit weights) avoids it
at some cost in precision. The quality gate of the build measures what it cost.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from deploykit.onnxtools import adapt_feed, cleanup, graph_signature, staged_folder
from deploykit.quantize.calibration import CalibrationBatch
from deploykit.quantize.exclude import DEFAULT_EXCLUDE, check_patterns, is_excluded, onnx_node_module

CALIBRATION_METHODS = ("minmax", "percentile", "entropy")
QUANTIZED_OPS = ("Conv", "MatMul", "Gemm")


@dataclass
class OrtInt8Config:
    per_channel: bool = True                         # weights: one scale per output channel
    exclude: Sequence[str] = DEFAULT_EXCLUDE         # module-name globs that stay float
    op_types: Sequence[str] = QUANTIZED_OPS
    calibration: str = "minmax"                      # minmax | percentile | entropy (the last two keep histograms)
    percentile: float = 99.999                       # for calibration == "percentile"
    activations: str = "uint8"                       # uint8 (asymmetric) | int8 (symmetric)
    reduce_range: bool = False                       # 7-bit weights (non-VNNI x86, see the module docstring)
    quantize_activation_matmuls: bool = False        # attention's Q·K^T and attention·V

    def __post_init__(self) -> None:
        check_patterns(self.exclude)
        if self.calibration not in CALIBRATION_METHODS:
            raise ValueError(f"calibration {self.calibration!r} is unknown (known: {', '.join(CALIBRATION_METHODS)})")
        if self.activations not in ("uint8", "int8"):
            raise ValueError(f"activations must be uint8 or int8, got {self.activations!r}")
        unknown = set(self.op_types) - set(QUANTIZED_OPS)
        if unknown:
            raise ValueError(f"op_types {sorted(unknown)} are not supported (supported: {', '.join(QUANTIZED_OPS)})")


@dataclass
class ExclusionPlan:
    candidates: list[str] = field(default_factory=list)  # op_types nodes that would be quantized
    excluded: dict[str, str] = field(default_factory=dict)  # node name -> why it stays float

    @property
    def quantized(self) -> list[str]:
        return [n for n in self.candidates if n not in self.excluded]


def plan_exclusions(model: onnx.ModelProto, config: OrtInt8Config) -> ExclusionPlan:
    """Which of the graph's Conv / MatMul / Gemm nodes are quantized and which stay float (and why)."""
    constants = {i.name for i in model.graph.initializer}
    constants |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    plan = ExclusionPlan()
    for node in model.graph.node:
        if node.op_type not in config.op_types:
            continue
        plan.candidates.append(node.name)
        module = onnx_node_module(node.name)
        if module is not None and is_excluded(module, config.exclude):
            plan.excluded[node.name] = f"module {module} matches exclude"
        elif (node.op_type == "MatMul" and not config.quantize_activation_matmuls
              and not any(x in constants for x in node.input)):
            plan.excluded[node.name] = "activation x activation MatMul (attention scores / values)"
    return plan


class _Reader:
    """onnxruntime.quantization.CalibrationDataReader over recorded batches, adapted to the graph's inputs."""

    def __init__(self, batches: Iterable[CalibrationBatch], signature: dict):
        self._batches = iter(list(batches))
        self._signature = signature

    def get_next(self):
        batch = next(self._batches, None)
        return None if batch is None else adapt_feed(batch, self._signature)

    def rewind(self):  # pragma: no cover - ONNX Runtime calls it on some versions
        pass


def _name_unnamed_nodes(model: onnx.ModelProto) -> None:
    used = {n.name for n in model.graph.node if n.name}
    for i, node in enumerate(model.graph.node):
        if not node.name:
            node.name = f"{node.op_type}_{i}"
            while node.name in used:
                node.name += "_"
            used.add(node.name)


def quantize_onnx(src: str | Path, dst: str | Path, batches: Sequence[CalibrationBatch],
                  config: OrtInt8Config | None = None) -> dict:
    """Quantize the fp32 ONNX model ``src`` into a QDQ INT8 model at ``dst`` (``dst`` appears only once complete).

    ``batches``: calibration inputs, one dict per model call (input name -> array). Returns a summary:
    the nodes quantized and excluded (with reasons), Q/DQ counts, sizes.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    config = config or OrtInt8Config()
    if not batches:
        raise ValueError("no calibration batches")
    src, dst = Path(src), Path(dst)
    skeleton = onnx.load(str(src), load_external_data=False)
    _name_unnamed_nodes(skeleton)
    plan = plan_exclusions(skeleton, config)
    large = any(t.data_location == onnx.TensorProto.EXTERNAL for t in skeleton.graph.initializer)
    signature = graph_signature(src)
    method = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
              "entropy": CalibrationMethod.Entropy}[config.calibration]
    act_type = QuantType.QUInt8 if config.activations == "uint8" else QuantType.QInt8
    extra = {"WeightSymmetric": True, "ActivationSymmetric": config.activations == "int8"}
    if config.calibration == "percentile":
        extra["CalibPercentile"] = config.percentile
    with staged_folder(dst.parent) as staging:
        work = staging / ".work"
        work.mkdir()
        named = src
        if any(not n.name for n in onnx.load(str(src), load_external_data=False).graph.node):
            # node names are what exclusion works on: give unnamed nodes the names the plan used
            named = work / "named.onnx"
            full = onnx.load(str(src))
            _name_unnamed_nodes(full)
            onnx.save(full, str(named), save_as_external_data=large)
        ort_logger = logging.getLogger("onnxruntime")  # "consider pre-processing" notices, see the docstring
        level = ort_logger.level
        ort_logger.setLevel(logging.ERROR)
        root_level = logging.getLogger().level
        logging.getLogger().setLevel(logging.ERROR)
        try:
            quantize_static(str(named), str(work / "model.onnx"), _Reader(batches, signature),
                            quant_format=QuantFormat.QDQ, op_types_to_quantize=list(config.op_types),
                            per_channel=config.per_channel, reduce_range=config.reduce_range,
                            activation_type=act_type, weight_type=QuantType.QInt8,
                            nodes_to_exclude=sorted(plan.excluded), use_external_data_format=large,
                            calibrate_method=method, extra_options=extra)
        finally:
            ort_logger.setLevel(level)
            logging.getLogger().setLevel(root_level)
        model, weights = cleanup.load_skeleton(work / "model.onnx")
        unwired = keep_float_inputs(model, set(plan.excluded))
        files = weights.save(model, staging / dst.name)
        cleanup.check_model(files[0])
        shutil.rmtree(work)
        written = {f.name: f.stat().st_size for f in files}
    counts = qdq_counts(dst)
    return {"format": "QDQ", "per_channel": config.per_channel, "calibration": config.calibration,
            "activations": config.activations, "weights": "int8", "reduce_range": config.reduce_range,
            "op_types": list(config.op_types), "exclude": list(config.exclude),
            "quantized_nodes": len(plan.quantized), "excluded_nodes": plan.excluded, "qdq": counts,
            "float_inputs_restored": unwired,
            "calibration_batches": len(batches), "files": written}


def keep_float_inputs(model: onnx.ModelProto, nodes: set[str]) -> int:
    """Make ``nodes`` read the float tensors again where ONNX Runtime rewired them to a shared Q -> DQ pair.

    ``quantize_static`` quantizes a tensor once for all its consumers: when a quantized Conv and an excluded
    one (conv1 and conv_shortcut of a ResNet block) read the same activation, both end up behind the same
    DequantizeLinear. Excluded means float, so their inputs are wired back to the tensor before the
    QuantizeLinear; pairs nobody reads any more are removed. Returns the inputs rewired.
    """
    graph = model.graph
    producers = {o: n for n in graph.node for o in n.output}
    rewired = 0
    for node in graph.node:
        if node.name not in nodes:
            continue
        for i, x in enumerate(node.input):
            dq = producers.get(x)
            q = producers.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
            if q is not None and q.op_type == "QuantizeLinear":
                node.input[i] = q.input[0]
                rewired += 1
    while True:  # drop Q / DQ nodes whose outputs nobody reads
        used = {x for n in graph.node for x in n.input} | {o.name for o in graph.output}
        dead = [n for n in graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear") and not any(o in used for o in n.output)]
        if not dead:
            return rewired
        for n in dead:
            graph.node.remove(n)


def qdq_counts(path: str | Path) -> dict:
    graph = onnx.load(str(path), load_external_data=False).graph
    return {op: sum(n.op_type == op for n in graph.node) for op in ("QuantizeLinear", "DequantizeLinear")}


def _source(name: str, producers: dict) -> onnx.NodeProto | None:
    """The node that makes tensor ``name``, looking through layout-only ops (a Linear's weight transpose)."""
    node = producers.get(name)
    while node is not None and node.op_type in ("Transpose", "Reshape", "Identity", "Cast", "Unsqueeze"):
        node = producers.get(node.input[0])
    return node


def int8_layers(path: str | Path) -> dict[str, dict[str, bool]]:
    """Conv / MatMul / Gemm node name -> ``{"weight": ..., "activation": ...}``: whether its weight (input 1)
    and its data input (input 0) are read through a DequantizeLinear, i.e. whether the layer runs in INT8.
    Works for both exporters' patterns: int8 initializer -> DQ (ONNX Runtime) and float weight -> Q -> DQ (modelopt)."""
    graph = onnx.load(str(path), load_external_data=False).graph
    producers = {o: n for n in graph.node for o in n.output}
    out = {}
    for node in graph.node:
        if node.op_type not in QUANTIZED_OPS or len(node.input) < 2:
            continue
        w, x = _source(node.input[1], producers), _source(node.input[0], producers)
        out[node.name] = {"weight": w is not None and w.op_type == "DequantizeLinear",
                          "activation": x is not None and x.op_type == "DequantizeLinear"}
    return out


def output_error(reference: str | Path, quantized: str | Path, batches: Sequence[CalibrationBatch]) -> dict:
    """Signal-to-quantization-noise ratio (dB) and max |diff| of the INT8 graph's output against the fp32
    graph's, on ``batches``."""
    from deploykit.onnxtools import ort_session

    sessions = [ort_session(reference), ort_session(quantized)]
    signatures = [graph_signature(reference), graph_signature(quantized)]
    signal = noise = 0.0
    worst = 0.0
    for batch in batches:
        a, b = (s.run(None, adapt_feed(batch, sig))[0].astype(np.float64) for s, sig in zip(sessions, signatures))
        signal += float((a ** 2).sum())
        noise += float(((a - b) ** 2).sum())
        worst = max(worst, float(np.abs(a - b).max()))
    snr = 10 * np.log10(signal / noise) if noise > 0 else float("inf")
    return {"snr_db": float(snr), "max_abs_error": worst, "batches": len(batches)}
