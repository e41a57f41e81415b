"""The "auto" range method: each activation range chosen between min/max and MSE by the model's output error.

    selection = select_ranges(rewritten, inputs, references, units, bits=8)
    selection.choice        # quantizer name -> "minmax" | "mse"

The MSE range (observers.MSEObserver) minimises each tensor's own quantization
error, but a clipped outlier can matter more downstream than the rounding noise
it saves (measured: MSE loses 0.3-0.7 dB against min/max on lightly trained
models and wins up to 1.4 dB on well-trained ones; docs/benchmarks.md).  The
calibrator (calibrator.py) keeps both candidates of every quantizer, holds out
its last samples with their float outputs, and this module decides with the
model itself, on those samples with the ranges of the samples before them:

  1. the fake-quant model `rewritten.model` is run with every range min/max, then
     with every range MSE; the start is MSE if it is `better` (below), else
     min/max (the converter's ranges: ties go to them);
  2. a greedy sweep in graph order: each *unit* (a quantizer, or a group of tied
     quantizers that share one range) whose two candidates differ by more than
     half a quantization step is flipped to its other candidate, and the flip is
     kept when the output error is `better`.

`better` means lower by more than `min_gain` (relative) and by more than `z`
standard errors of the per-sample paired differences: on ~100 samples SQNR
moves by tenths of a dB from a few samples, and a flip on such a "gain" is as
likely to lose on the next samples.  The result is never worse than the start
on the samples, so never worse than min/max, nor than MSE where MSE started.

The error of a model is the sum over its outputs of noise power over signal
power (sum((float - fake quant)^2) / sum(float^2)), i.e. 10^(-SQNR/10) summed:
each output counts by its own relative error whatever its scale, and the worst
output dominates (a mean of dB values would let a good output hide a bad one).

Cost: 2 + (number of differing units) forward passes of the fake-quant model on
the samples.  When that would exceed `max_seconds` (estimated from the second
pass), fewer samples are used (down to `min_samples`) and then neighbouring
units are flipped together in blocks, so the sweep fits.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Sequence

import numpy as np
import tensorflow as tf

from qtoolkit._progress import progress_bar

CANDIDATES = ("minmax", "mse")


@dataclasses.dataclass(frozen=True)
class Unit:
    """Quantizers that share one range, and the range each candidate method gives them.

    Attributes:
      names: the quantizer layer names (one, or a tie group).
      ranges: method name ("minmax", "mse") -> (min, max).
    """

    names: tuple
    ranges: dict


@dataclasses.dataclass(frozen=True)
class Selection:
    """What the "auto" method chose and what it measured on its samples.

    Attributes:
      choice: quantizer name -> "minmax" or "mse".
      start: the pure method the sweep started from ("mse" if `better` than min/max, else "minmax").
      error: method ("minmax", "mse", "auto") -> output error (sum over outputs of noise / signal power).
      samples: samples the model ran on.
      candidates: units whose two ranges differ (the others take either).
      blocks: flips tried (== candidates unless units were flipped in blocks to fit the time budget).
      evaluations: forward passes of the fake-quant model.
      seconds: wall time of the selection.
    """

    choice: dict
    start: str
    error: dict
    samples: int
    candidates: int
    blocks: int
    evaluations: int
    seconds: float

    def sqnr_db(self, method: str) -> float:
        """10 log10(1 / error) of a method: the SQNR in dB for a one-output model."""
        e = self.error[method]
        return float("inf") if e <= 0 else float(-10 * np.log10(e))

    def summary(self) -> str:
        """One line: what was chosen and the measured errors."""
        n_mse = sum(1 for c in self.choice.values() if c == "mse")
        return (f"auto ranges: {n_mse} MSE, {len(self.choice) - n_mse} min/max "
                f"(from {self.start}; {self.candidates} differ, {self.blocks} flips tried on {self.samples} samples, "
                f"{self.seconds:.1f} s); output SQNR on them: min/max {self.sqnr_db('minmax'):.2f} dB, "
                f"MSE {self.sqnr_db('mse'):.2f} dB, auto {self.sqnr_db('auto'):.2f} dB")


def differs(a: tuple, b: tuple, bits: int) -> bool:
    """True when two ranges differ by more than half a step of the wider one's grid."""
    step = max(a[1] - a[0], b[1] - b[0]) / ((1 << bits) - 1)
    return abs(a[0] - b[0]) > 0.5 * step or abs(a[1] - b[1]) > 0.5 * step


def output_error(references: Sequence[np.ndarray], outputs: Sequence[np.ndarray]) -> np.ndarray:
    """Each sample's share of the output error: sum over outputs of its sum((ref - out)^2) / sum(ref^2) over all
    the samples (the sum of the vector is the model's error, see the module docstring); inf if not finite."""
    total = np.zeros(len(references[0]), np.float64)
    for ref, out in zip(references, outputs):
        ref = np.asarray(ref, np.float64).reshape(len(ref), -1)
        noise = np.sum((ref - np.asarray(out, np.float64).reshape(len(ref), -1)) ** 2, axis=1)
        total += noise / max(float(np.sum(ref ** 2)), 1e-30)
    return total if np.all(np.isfinite(total)) else np.full_like(total, np.inf)


def better(trial: np.ndarray, current: np.ndarray, min_gain: float, z: float) -> bool:
    """True when `trial` (per-sample errors) beats `current` by more than `min_gain` (relative) and by more than
    `z` standard errors of the paired per-sample differences (a gain the samples cannot tell from noise is not
    one: on 100 samples a flip "gaining" 0.05 dB is as likely to lose on the next 100)."""
    if not np.all(np.isfinite(trial)):
        return False
    if not np.all(np.isfinite(current)):
        return True
    d = current - trial
    gain = float(d.sum())
    se = float(np.sqrt(len(d)) * d.std(ddof=1)) if len(d) > 1 else 0.0
    return gain > min_gain * float(current.sum()) and gain > z * se


def select_ranges(rewritten, inputs: list, references: list, units: Sequence[Unit], bits: int,
                  max_seconds: float = 20.0, min_samples: int = 32, min_gain: float = 0.002, z: float = 1.0,
                  batch_size: int = 64, progress: bool = True) -> Selection:
    """Chooses each unit's range by the output error of `rewritten.model` (see the module docstring).

    Args:
      rewritten: a `rewrite.Rewritten`; its model's quantizer ranges are set (and left at the choice).
      inputs: the samples, one array per model input.
      references: the float model's outputs on them, one array per model output.
      units: every calibrated quantizer in exactly one unit, in graph order.
      bits: activation bits (for "differs by half a step").
      max_seconds: time budget of the sweep (fewer samples, then blocks of units, past it).
      min_samples: fewest samples the budget may cut down to.
      min_gain: relative error decrease a flip must bring to be kept.
      z: standard errors (of the per-sample differences) a flip's gain must exceed to be kept.
      batch_size: batch of the forward passes.
      progress: show a progress bar.

    Returns:
      The Selection (`choice`: quantizer name -> method); the model is left with the chosen ranges of `units`.
    """
    start_time = time.perf_counter()
    layers = {n: rewritten.model.get_layer(n) for u in units for n in u.names}
    n_total = int(inputs[0].shape[0])

    @tf.function(reduce_retracing=True)
    def run(x):
        return rewritten.model(x, training=False)

    def apply(unit: Unit, method: str) -> None:
        for n in unit.names:
            layers[n].set_range(*unit.ranges[method])

    def error(n: int) -> np.ndarray:
        # Equal chunks (the last one padded with the first rows): one batch shape, one trace.
        chunks = -(-n // batch_size)
        size = -(-n // chunks)
        padded = [np.concatenate([x[:n]] + [x[:size * chunks - n]]) for x in inputs]
        outs = None
        for s in range(0, size * chunks, size):
            batch = [x[s:s + size] for x in padded]
            got = run(batch if len(batch) > 1 else batch[0])
            got = [t.numpy() for t in (got if isinstance(got, (list, tuple)) else [got])]
            outs = [[g] for g in got] if outs is None else [o + [g] for o, g in zip(outs, got)]
        return output_error([r[:n] for r in references], [np.concatenate(o)[:n] for o in outs])

    # The two pure starts, timed: the second pass is the cost of one evaluation (the first one traces).
    evaluations = 0
    errors = {}
    for method in CANDIDATES:
        for u in units:
            apply(u, method)
        t = time.perf_counter()
        errors[method] = error(n_total)
        evaluations += 1
    per_sample = (time.perf_counter() - t) / max(n_total, 1)
    # The start: MSE where it is better beyond noise, else min/max (the converter's ranges: ties go to it).
    best = "mse" if better(errors["mse"], errors["minmax"], min_gain, z) else "minmax"
    choice = {u.names: best for u in units}
    flips = [u for u in units if differs(u.ranges["minmax"], u.ranges["mse"], bits)]

    # Fit the sweep into the budget: first fewer samples, then blocks of neighbouring units.
    remaining = max(max_seconds - (time.perf_counter() - start_time), 0.0)
    n = n_total
    if flips and len(flips) * per_sample * n > remaining:
        n = min(n_total, max(min_samples, int(remaining / (len(flips) * per_sample))))
    n_blocks = len(flips)
    if flips and n_blocks * per_sample * n > remaining:
        n_blocks = max(1, int(remaining / (per_sample * n)))
    blocks = [[flips[i] for i in b] for b in np.array_split(np.arange(len(flips)), n_blocks) if len(b)] \
        if flips else []

    for u in units:
        apply(u, best)
    current = errors[best] if n == n_total else error(n)
    evaluations += n != n_total
    bar = progress_bar(len(blocks), progress and bool(blocks), "choosing ranges", "flip")
    for block in blocks:
        for u in block:
            apply(u, _other(choice[u.names]))
        trial = error(n)
        evaluations += 1
        if better(trial, current, min_gain, z):
            current = trial
            for u in block:
                choice[u.names] = _other(choice[u.names])
        else:
            for u in block:
                apply(u, choice[u.names])
        bar.update(1)
    bar.close()
    errors["auto"] = current if n == n_total else error(n_total)
    evaluations += n != n_total
    if errors["auto"].sum() > errors[best].sum():  # flips chosen on fewer samples did worse on all: the start
        choice = {u.names: best for u in units}
        for u in units:
            apply(u, best)
        errors["auto"] = errors[best]
    return Selection({n_: choice[u.names] for u in units for n_ in u.names}, best,
                     {m: float(e.sum()) for m, e in errors.items()}, n, len(flips), len(blocks), evaluations,
                     time.perf_counter() - start_time)


def _other(method: str) -> str:
    return "mse" if method == "minmax" else "minmax"
