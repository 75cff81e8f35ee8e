"""The student set against what a user would run without deploykit.

Beside the teacher-vs-student speedup of each backend, a build answers: how much faster is the
fastest student configuration measured than (a) the dense teacher in torch eager, what users run by
default, and (b) the fastest dense configuration measured in the same window, on any backend, fp32
or INT8 (what the user could have had without pruning)? Every figure comes from one round-robin
window (:func:`deploykit.bench.measure_rounds`), so the ratios share the drift of the machine.
"""

from __future__ import annotations

from dataclasses import dataclass

from deploykit.bench.latency import Rounds

# A runtime's own inference precision (OpenVINO's INFERENCE_PRECISION_HINT: bf16 on CPUs with AVX-512 BF16
# or AMX), for fp32 graphs and for the float layers of INT8 (QDQ) graphs alike: it is what a user gets who
# hands OpenVINO the ONNX file and sets nothing, and on an AMX Xeon it is the fastest, dense and pruned.
RUNTIME_DEFAULT = "default"

@dataclass(frozen=True)
class Config:
    """One model on one backend in one precision, as timed in the window under :attr:`key`."""

    backend: str
    model: str      # teacher, student, teacher-int8, student-int8
    precision: str  # fp32, fp16, int8 or RUNTIME_DEFAULT

    @property
    def key(self) -> str:
        # the model's name implies fp32 / fp16 / int8; the runtime's own choice is timed beside its fp32
        return f"{self.backend} {self.model}" + (f" {RUNTIME_DEFAULT}" if self.precision == RUNTIME_DEFAULT else "")

    @property
    def setting(self) -> str:
        """The precision as a reader needs it: an INT8 graph under the runtime's own choice is "int8 default"
        (its quantized layers in INT8, the rest in that precision)."""
        quantized = self.model.endswith("-int8") and self.precision == RUNTIME_DEFAULT
        return f"int8 {self.precision}" if quantized else self.precision

    @property
    def label(self) -> str:
        return f"{self.backend} {self.setting}"

    @property
    def dense(self) -> bool:
        return self.model.startswith("teacher")


def _against(rounds: Rounds, student: Config, reference: Config) -> dict:
    ref, mine = rounds.latency(reference.key), rounds.latency(student.key)
    return {"config": reference.label, "p50_ms": ref.p50_ms, "speedup": ref.p50_ms / mine.p50_ms,
            "speedup_pair_median": rounds.ratio_median(reference.key, student.key)}


def peers(rounds: Rounds, configs: list[Config], eager: Config | None) -> dict:
    """The fastest student configuration against ``eager`` (the dense teacher in torch eager; None where
    torch was not timed eagerly) and against the fastest dense configuration; with every p50 measured."""
    p50 = {c: rounds.latency(c.key).p50_ms for c in configs}
    students = [c for c in configs if not c.dense]
    dense = [c for c in configs if c.dense]
    best = min(students, key=p50.__getitem__)
    out: dict = {"student": {"config": best.label, "model": best.model, "p50_ms": p50[best]}}
    if eager is not None:
        out[f"vs_dense_torch_eager_{eager.precision}"] = _against(rounds, best, eager)
    out["vs_fastest_dense"] = _against(rounds, best, min(dense, key=p50.__getitem__))
    out["measured_p50_ms"] = {"dense": {c.label: p50[c] for c in dense}, "student": {c.label: p50[c] for c in students}}
    return out
