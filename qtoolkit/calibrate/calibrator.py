"""The calibration pass: representative data through the float twin, batched.

    ranges = calibrate(rewritten, source, num_samples=500, scheme=scheme)

Runs `rewritten.float_model` (folded, fused, no fake quant) on batches, feeds
each activation quantizer's input to an observer, then sets every range of
the fake-quant model.  Calibration sees float activations, as the TFLite
converter's own calibration does, so qtoolkit and the converter differ only
in where quantizers sit and how ranges are chosen.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from typing import Optional

import numpy as np

import tensorflow as tf

from qtoolkit._progress import progress_bar
from qtoolkit.batched import run_batched
from qtoolkit.calibrate.data import Source
from qtoolkit.calibrate import select
from qtoolkit.calibrate.observers import make_observer
from qtoolkit.schemes import QuantScheme

SELECTION_SAMPLES = 128  # samples the "auto" method measures the output error on
SELECTION_SECONDS = 20.0  # its time budget (fewer samples, then flips in blocks, past it)
SELECTION_Z = 2.0  # standard errors a flip's gain must exceed (select.better)


@dataclasses.dataclass(frozen=True)
class Calibration:
    """Ranges chosen for each activation quantizer, and what it took.

    Attributes:
      ranges: quantizer name -> (min, max) as assigned (after sanitizing).
      samples: number of samples run.
      seconds: wall time of the pass.
      method: range method used.
      selection: for "auto", what was chosen per quantizer and the errors measured (`select.Selection`).
      shards: the number of shards merged, where the ranges come from calibration in parts (calibrate/shards.py).
    """

    ranges: dict
    samples: int
    seconds: float
    method: str
    selection: Optional[select.Selection] = None
    shards: Optional[int] = None


@dataclasses.dataclass
class Observed:
    """What a calibration pass (or part of one) saw: mergeable, in stream order, with `merge`.

    Attributes:
      observers: quantizer name -> observer, over every sample seen.
      before_holdout: "auto" only: the observers over the samples before the held-out ones.
      holdout_inputs: "auto" only: the held-out samples seen, one array per model input.
      samples: samples seen.
    """

    observers: dict
    before_holdout: Optional[dict]
    holdout_inputs: Optional[list]
    samples: int


def merge(parts: list) -> Observed:
    """One `Observed` from parts of a stream, given in stream order (as one pass over them all would be)."""
    first = parts[0]
    observers = copy.deepcopy(first.observers)
    before = copy.deepcopy(first.before_holdout)
    held = [list(p.holdout_inputs) for p in parts if p.holdout_inputs]
    for part in parts[1:]:
        for name, observer in observers.items():
            observer.merge(part.observers[name])
            if before is not None:
                before[name].merge(part.before_holdout[name])
    holdout = [np.concatenate([h[i] for h in held]) for i in range(len(held[0]))] if held else None
    return Observed(observers, before, holdout, sum(p.samples for p in parts))


def calibrate(rewritten, source: Source, num_samples: int, scheme: QuantScheme, batch_size: int = 32,
              progress: bool = True) -> Calibration:
    """Calibrates every activation range of `rewritten.model` (see module docstring)."""
    if scheme.activations is None:
        return Calibration({}, 0, 0.0, "none")
    start = time.perf_counter()
    observed = observe(rewritten, source, num_samples, scheme, batch_size, progress)
    return assign(rewritten, observed, scheme, progress, time.perf_counter() - start)


def _auto(rewritten, scheme: QuantScheme, num_samples: int) -> bool:
    return scheme.activations.method == "auto" and bool(rewritten.quant_points) and num_samples >= 2


def observe(rewritten, source: Source, num_samples: int, scheme: QuantScheme, batch_size: int = 32,
            progress: bool = True, block: Optional[tuple] = None) -> Observed:
    """Runs samples through the float twin into one observer per activation quantizer.

    Args:
      rewritten, source, num_samples, scheme, batch_size, progress: as for `calibrate`; `num_samples` is the
        whole pass's, also when `block` is a part of it.
      block: (start, stop): only samples start..stop-1 of the pass, the source already at `start` (a shard,
        calibrate/shards.py); default the whole pass.
    """
    names = rewritten.quant_points
    n_out = len(rewritten.model.outputs)
    observers = {n: make_observer(scheme.activations) for n in names}
    first, stop = block or (0, num_samples)

    @tf.function(reduce_retracing=True)
    def run(inputs):
        return rewritten.float_model(inputs, training=False)

    auto = _auto(rewritten, scheme, num_samples)
    # "auto": the candidates are judged on held-out samples, the last ones: `before` holds the observers as
    # they were before them (ranges from the first samples only), `kept` the held-out inputs.
    cut = _holdout_start(num_samples, batch_size) if auto else num_samples
    before = copy.deepcopy(observers) if auto and first >= cut else None
    kept = []
    bar = progress_bar(stop - first, progress, "calibrating", "sample")
    seen = first
    for batch in source.take(stop - first, batch_size):
        outputs = run(batch if len(batch) > 1 else batch[0])
        outputs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
        size = batch[0].shape[0]
        split = min(max(cut - seen, 0), size) if auto else size  # rows of this batch before the cut
        tensors = [t.numpy() for t in outputs[n_out:]]
        for name, tensor in zip(names, tensors):
            observers[name].update(tensor if split in (0, size) else tensor[:split])
        if auto and before is None and seen + split >= cut:
            before = copy.deepcopy(observers)
            if 0 < split < size:
                for name, tensor in zip(names, tensors):
                    observers[name].update(tensor[split:])
        if auto and seen + size > cut:
            kept.append([np.asarray(x[split:]) for x in batch])
        seen += size
        bar.update(size)
    bar.close()
    if auto and before is None:  # a part that ends before the held-out samples
        before = copy.deepcopy(observers)
    holdout = [np.concatenate([b[i] for b in kept]) for i in range(len(kept[0]))] if kept else None
    return Observed(observers, before, holdout, seen - first)


def assign(rewritten, observed: Observed, scheme: QuantScheme, progress: bool = True,
           seconds: float = 0.0) -> Calibration:
    """Chooses every range from what was observed (for "auto", measuring on the held-out samples) and sets it
    on `rewritten.model`."""
    names = rewritten.quant_points
    groups = _tie_groups(rewritten.tied_points)
    start = time.perf_counter()
    selection = None
    if observed.before_holdout is not None and observed.holdout_inputs is not None:
        chosen, selection = _select(rewritten, observed, groups, scheme, progress)
    else:
        chosen = _tied({name: observed.observers[name].range() for name in names}, groups)
    ranges = {}
    for name in names:
        layer = rewritten.model.get_layer(name)
        layer.set_range(*chosen[name])
        ranges[name] = layer.get_range()
    for name in rewritten.fixed_points:
        ranges[name] = rewritten.model.get_layer(name).get_range()
    return Calibration(ranges, observed.samples, seconds + time.perf_counter() - start,
                       scheme.activations.method, selection)


def _tied(chosen: dict, groups) -> dict:
    """`chosen` with each tie group given one shared range, the union: equal scales and zero points."""
    chosen = dict(chosen)
    for group in groups:
        shared = (min(chosen[n][0] for n in group), max(chosen[n][1] for n in group))
        chosen.update({n: shared for n in group})
    return chosen


def _holdout_start(n: int, batch_size: int) -> int:
    """Where the held-out samples of "auto" start: at most SELECTION_SAMPLES, at most half of `n`, on a batch
    boundary where one falls in [n - SELECTION_SAMPLES, n) (the observers then see whole batches)."""
    cut = max(n - SELECTION_SAMPLES, (n + 1) // 2)
    aligned = -(-cut // batch_size) * batch_size
    return aligned if aligned < n else cut


def _units(names, candidates, groups) -> list:
    """One `select.Unit` per quantizer or tie group (the union of its members' ranges), in graph order."""
    per_method = {m: _tied({n: candidates[n][m] for n in names}, groups) for m in select.CANDIDATES}
    grouped = {n: g for g in groups for n in g}
    units, done = [], set()
    for n in names:  # a tie group where its first member is
        if n in done:
            continue
        members = tuple(grouped.get(n, [n]))
        done.update(members)
        units.append(select.Unit(members, {m: per_method[m][n] for m in select.CANDIDATES}))
    return units


def _select(rewritten, observed: Observed, groups, scheme, progress):
    """The "auto" choice: per unit (a quantizer or a tie group), min/max or MSE, whichever gives the lower
    output error on the held-out samples with ranges from the samples before them; the chosen method's
    range from all the samples is then assigned."""
    names = rewritten.quant_points
    held_out = _units(names, {n: observed.before_holdout[n].candidates() for n in names}, groups)
    inputs = observed.holdout_inputs
    references = run_batched(rewritten.float_model, inputs)[:len(rewritten.model.outputs)]
    selection = select.select_ranges(rewritten, inputs, references, held_out, scheme.activations.bits,
                                     max_seconds=SELECTION_SECONDS, z=SELECTION_Z, progress=progress)
    full = _units(names, {n: observed.observers[n].candidates() for n in names}, groups)
    return {n: u.ranges[selection.choice[n]] for u in full for n in u.names}, selection


def _tie_groups(pairs) -> list[list[str]]:
    """The connected groups of quantizer names linked by `pairs` (ties are transitive)."""
    parent: dict[str, str] = {}

    def root(n):
        while parent.setdefault(n, n) != n:
            parent[n] = parent[parent[n]]
            n = parent[n]
        return n

    for a, b in pairs:
        parent[root(a)] = root(b)
    groups: dict[str, list[str]] = {}
    for n in parent:
        groups.setdefault(root(n), []).append(n)
    return list(groups.values())
