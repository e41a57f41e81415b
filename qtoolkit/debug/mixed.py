"""Automatic mixed precision: keep the fewest most-sensitive layers float so the exported model meets a budget.

The candidates are ranked by `analyze`'s sensitivities; each one is exported
and measured with the LiteRT interpreter (output SQNR, or accuracy drop
against labels), with its size and median latency.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import numpy as np

from qtoolkit import export, latency, verify
from qtoolkit.batched import run_batched
from qtoolkit.debug.measure import EnabledQuantizers, analyze, layer_quantizers
from qtoolkit.errors import DebugError
from qtoolkit.debug.report_files import format_db
from qtoolkit.debug.setup import setup


@dataclasses.dataclass(frozen=True)
class Choice:
    """One candidate model: the layers kept float and what was measured on it with the LiteRT interpreter."""

    kept_float: tuple
    sqnr_db: float
    accuracy_drop: Optional[float]
    size_bytes: int
    latency_ms: float
    meets_budget: bool


@dataclasses.dataclass(frozen=True)
class MixedPrecision:
    """What `mixed_precision` chose (`tflite`, the first choice meeting the budget) and every choice tried."""

    tflite: bytes
    kept_float: tuple
    choices: tuple
    budget: str
    met: bool

    def summary(self) -> str:
        """The outcome in one sentence and a Markdown table of every choice tried."""
        lines = [f"mixed precision, budget {self.budget}: "
                 + (f"met keeping {len(self.kept_float)} layer(s) float: {', '.join(self.kept_float) or 'none'}"
                    if self.met else "NOT met even with every measured layer kept float"),
                 "| layers kept float | output SQNR (dB) | accuracy drop (points) | size (bytes) | latency (ms) | meets |",
                 "|---|---:|---:|---:|---:|---|"]
        for c in self.choices:
            drop = "-" if c.accuracy_drop is None else f"{c.accuracy_drop:.2f}"
            lines.append(f"| {', '.join(c.kept_float) or '(none: all int8)'} | {format_db(c.sqnr_db)} | {drop} | "
                         f"{c.size_bytes} | {c.latency_ms:.3f} | {'yes' if c.meets_budget else 'no'} |")
        return "\n".join(lines)


def mixed_precision(model: Any, calibration_data: Any = None, scheme: Any = "int8", output: Optional[str] = None, *,
                    budget_min_sqnr: Optional[float] = None, budget_max_accuracy_drop: Optional[float] = None,
                    labels: Optional[np.ndarray] = None, num_calibration_samples: Optional[int] = None,
                    num_samples: Optional[int] = None, io_dtype: str = "int8", allow_unsafe: bool = False,
                    progress: bool = False, image_size=None, image_scale=(0.0, 1.0), image_mean=None,
                    image_std=None, image_resize: str = "stretch") -> MixedPrecision:
    """Keeps the fewest layers float (most sensitive first) so the exported model meets the budget.

    Each candidate is converted and measured with the LiteRT interpreter on
    the held-out samples (output SQNR against the float model, or the top-1
    accuracy drop in points against `labels` of those samples); its size and
    median latency (latency.median_ms) are reported.  Layers kept at higher
    precision are kept float: the fake-quant path has no 16-bit activations.

    `model` is a `prepare.Prepared` state (as `convert` hands on; the data and
    sample arguments are then the ones it was prepared with) or a model and data.

    Raises:
      ValueError: no budget or both, or an accuracy budget without labels.
    """
    if (budget_min_sqnr is None) == (budget_max_accuracy_drop is None):
        raise ValueError("give exactly one budget: budget_min_sqnr (dB) or budget_max_accuracy_drop (points)")
    if budget_max_accuracy_drop is not None and labels is None:
        raise ValueError("budget_max_accuracy_drop needs the labels of the verification samples (--labels)")
    if output:
        export.check_writable(output)
    s = setup(model, calibration_data, scheme, num_calibration_samples, num_samples, allow_unsafe, progress,
              image_size, image_scale, image_mean, image_std, image_resize)
    if s.scheme.activations.bits != 8:
        raise DebugError(f"mixed precision starts from an 8-bit activation scheme, not {s.scheme.name!r}")
    report = analyze(None, None, s.scheme, tflite=False, _setup=s)
    x = s.samples
    ref = run_batched(s.keras_model, x)[0]
    y = None if labels is None else np.asarray(labels).reshape(-1)[:x[0].shape[0]]
    if y is not None and y.shape[0] != x[0].shape[0]:
        raise ValueError(f"{y.shape[0]} labels for {x[0].shape[0]} verification samples")
    unit_of = {u[1]: u for u in s.units}
    budget = (f"output SQNR >= {budget_min_sqnr} dB" if budget_min_sqnr is not None
              else f"accuracy drop <= {budget_max_accuracy_drop} points")
    all_names = {name for name, _ in layer_quantizers(s.rewritten.model)}
    choices, chosen = [], None
    for k in range(len(report.layers) + 1):
        kept = report.layers[:k]
        off = {n for e in kept for n in unit_of[e.quantizer][1:] if n}
        with EnabledQuantizers(s.rewritten.model, all_names - off):
            data = export.fake_quant_to_tflite(s.rewritten.model, io_dtype)
        out = verify.LiteRTModel(data).predict(x)
        out = out[0] if isinstance(out, list) else out
        comparison = verify.compare(ref, out, y)
        drop = comparison.accuracy_drop
        meets = comparison.sqnr_db >= budget_min_sqnr if budget_min_sqnr is not None else (
            drop is not None and drop <= budget_max_accuracy_drop)
        choice = Choice(tuple(e.name for e in kept), comparison.sqnr_db, drop, len(data),
                        latency.median_ms(data, inputs=x), bool(meets))
        choices.append(choice)
        if meets:
            chosen = (data, choice)
            break
    if chosen is None:
        chosen = (data, choices[-1])
    if output:
        export.write_atomic(output, chosen[0])
    return MixedPrecision(chosen[0], chosen[1].kept_float, tuple(choices), budget, chosen[1].meets_budget)
