"""How a TFLite model runs in LiteRT with its default XNNPACK delegate.

    d = runtime.delegation(tflite_bytes)
    d.partitions        # XNNPACK partitions (delegate nodes)
    d.outside           # [(op type, output tensor name)] run by the built-in kernels
    report = runtime.report(float_bytes, int8_bytes, benchmark=True)
    print(report.summary()); report.problems()   # what the guard warns about

XNNPACK takes the ops it supports and replaces each maximal run of them with
one delegate node; every op it does not take splits the graph and runs in
TFLite's built-in kernels, with a hand-over between the two on each side.  The
interpreter keeps the original nodes after the delegate nodes in its node
list: an original op ran inside the delegate when one of its outputs is a
delegate node's output, or when all its readers are delegated ops and none is
outside the delegate (internal tensors of a partition are nobody's output).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from qtoolkit import latency
from qtoolkit.errors import RuntimeGuardError  # noqa: F401  (raised here; defined with the others)

DELEGATE_OP = "DELEGATE"


@dataclasses.dataclass(frozen=True)
class Delegation:
    """XNNPACK delegation of one flatbuffer (primary subgraph).

    Attributes:
      ops: number of ops in the model.
      partitions: delegate nodes XNNPACK created.
      outside: (op type, first output tensor name) of each op left to the built-in kernels.
    """

    ops: int
    partitions: int
    outside: list

    @property
    def fully_delegated(self) -> bool:
        return self.partitions == 1 and not self.outside

    def to_dict(self) -> dict:
        return {"ops": self.ops, "partitions": self.partitions, "outside": [list(o) for o in self.outside],
                "fully_delegated": self.fully_delegated}

    def summary(self) -> str:
        head = f"{self.partitions} XNNPACK partition(s), {len(self.outside)}/{self.ops} ops outside the delegate"
        if not self.outside:
            return head
        return head + ": " + ", ".join(f"{op} ({name})" for op, name in self.outside)


def delegation(model: bytes) -> Delegation:
    """Partitions and non-delegated ops of `model` under LiteRT's default XNNPACK delegate."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=bytes(model), num_threads=1)
    interpreter.allocate_tensors()
    nodes = interpreter._get_ops_details()
    delegates = [n for n in nodes if n["op_name"] == DELEGATE_OP]
    originals = [n for n in nodes if n["op_name"] != DELEGATE_OP]
    delegate_out = {t for n in delegates for t in n["outputs"]}
    delegate_in = {t for n in delegates for t in n["inputs"]}
    graph_out = set(interpreter._interpreter.OutputIndices())
    readers: dict[int, list[int]] = {}
    for n in originals:
        for t in n["inputs"]:
            readers.setdefault(t, []).append(n["index"])
    inside: dict[int, bool] = {}
    for n in reversed(originals):  # the node list is in execution order: readers come later
        outs = list(n["outputs"])
        if any(t in delegate_out for t in outs):
            inside[n["index"]] = bool(delegates)
        else:
            inside[n["index"]] = bool(delegates) and bool(outs) and not any(
                t in delegate_in or t in graph_out for t in outs) and all(
                inside.get(r, False) for t in outs for r in readers.get(t, [None]))
    names = {t["index"]: t["name"] for t in interpreter.get_tensor_details()}
    outside = [(n["op_name"], names.get(n["outputs"][0], "") if len(n["outputs"]) else "")
               for n in originals if not inside[n["index"]]]
    return Delegation(ops=len(originals), partitions=len(delegates), outside=outside)


@dataclasses.dataclass(frozen=True)
class RuntimeReport:
    """Delegation of the float and the quantized model, and optionally their latency.

    Attributes:
      float: Delegation of the float model.
      quantized: Delegation of the quantized model.
      latency_ms: {"float"|"quantized": {threads: median ms}} or None when not benchmarked.
      runs: timed invokes per median.
    """

    float: Delegation
    quantized: Delegation
    latency_ms: Optional[dict] = None
    runs: int = 0

    def speedup(self, threads: int) -> Optional[float]:
        """float / quantized median latency at `threads` (above 1: quantized is faster)."""
        if not self.latency_ms:
            return None
        return self.latency_ms["float"][threads] / self.latency_ms["quantized"][threads]

    def problems(self) -> list[str]:
        """What keeps the quantized model off the fast path, in words (empty when nothing does)."""
        found = []
        q = self.quantized
        if q.outside:
            found.append(f"the quantized model leaves {len(q.outside)} op(s) outside the XNNPACK delegate "
                         f"({q.partitions} partitions): " + ", ".join(f"{op} ({name})" for op, name in q.outside))
        elif q.partitions != 1:
            found.append(f"the quantized model has {q.partitions} XNNPACK partitions")
        if self.latency_ms:
            for threads in sorted(self.latency_ms["float"]):
                f, i = self.latency_ms["float"][threads], self.latency_ms["quantized"][threads]
                if i > f:
                    found.append(f"the quantized model is slower than the float model at {threads} thread(s): "
                                 f"{i:.3f} ms vs {f:.3f} ms")
        return found

    def to_dict(self) -> dict:
        return {"float": self.float.to_dict(), "quantized": self.quantized.to_dict(), "runs": self.runs,
                "latency_ms": None if not self.latency_ms else {
                    k: {str(t): v for t, v in d.items()} for k, d in self.latency_ms.items()},
                "problems": self.problems()}

    def summary(self) -> str:
        lines = [f"runtime (LiteRT, XNNPACK): float {self.float.summary()}",
                 f"runtime (LiteRT, XNNPACK): quantized {self.quantized.summary()}"]
        if self.latency_ms:
            for threads in sorted(self.latency_ms["float"]):
                f, i = self.latency_ms["float"][threads], self.latency_ms["quantized"][threads]
                lines.append(f"latency {threads} thread(s), batch 1, median of {self.runs}: float {f:.3f} ms, "
                             f"quantized {i:.3f} ms ({f / i:.2f}x)")
        return "\n".join(lines)


def alternate_median_ms(models: dict, threads: int = 1, runs: int = 50, rounds: int = 5, inputs=None) -> dict:
    """Median latency of each model, measured in alternation (`rounds` rounds of runs/rounds invokes).

    `inputs`: samples fed to every model (latency.median_ms; without them, random values and zero ids).

    Alternating spreads slow phases of a shared machine over every model
    instead of charging them to whichever was measured then.
    """
    import numpy as np

    per_round = max(1, runs // rounds)
    samples = {k: [] for k in models}
    for _ in range(rounds):
        for key, data in models.items():
            samples[key].append(latency.median_ms(data, threads=threads, runs=per_round, warmup=3,
                                                     inputs=inputs))
    return {k: float(np.median(v)) for k, v in samples.items()}


def report(float_model: bytes, quantized_model: bytes, benchmark: bool = False, threads=(1, 2),
           runs: int = 50, inputs=None) -> RuntimeReport:
    """Delegation of both models; with `benchmark`, their latency at each thread count (alternating), on
    `inputs` (samples, one array per model input) when given."""
    lat = None
    if benchmark:
        lat = {"float": {}, "quantized": {}}
        for t in threads:
            ms = alternate_median_ms({"float": float_model, "quantized": quantized_model}, threads=t, runs=runs,
                                     inputs=inputs)
            lat["float"][t], lat["quantized"][t] = ms["float"], ms["quantized"]
    return RuntimeReport(delegation(float_model), delegation(quantized_model), lat, runs if benchmark else 0)
