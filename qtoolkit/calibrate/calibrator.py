"""The calibration pass: representative data through the float twin, batched.

    ranges = calibrate(rewritten, source, num_samples=500, scheme=scheme)

Runs `rewritten.float_model` (folded, fused, no fake quant) on batches, feeds
each activation quantizer's input to an observer, then sets every range of
the fake-quant model.  Calibration sees float activations, as the TFLite
converter's own calibration does, so qtoolkit and the converter differ only
in where quantizers sit and how ranges are chosen.
"""

from __future__ import annotations

import dataclasses
import sys
import time

import tensorflow as tf

from qtoolkit.calibrate.data import Source
from qtoolkit.calibrate.observers import make_observer
from qtoolkit.schemes import QuantScheme


@dataclasses.dataclass(frozen=True)
class Calibration:
    """Ranges chosen for each activation quantizer, and what it took.

    Attributes:
      ranges: quantizer name -> (min, max) as assigned (after sanitizing).
      samples: number of samples run.
      seconds: wall time of the pass.
      method: range method used.
    """

    ranges: dict
    samples: int
    seconds: float
    method: str


def calibrate(rewritten, source: Source, num_samples: int, scheme: QuantScheme, batch_size: int = 32,
              progress: bool = True) -> Calibration:
    """Calibrates every activation range of `rewritten.model` (see module docstring)."""
    if scheme.activations is None:
        return Calibration({}, 0, 0.0, "none")
    start = time.perf_counter()
    n_out = len(rewritten.model.outputs)
    names = rewritten.quant_points
    observers = {n: make_observer(scheme.activations) for n in names}

    @tf.function(reduce_retracing=True)
    def run(inputs):
        return rewritten.float_model(inputs, training=False)

    bar = _progress(num_samples, progress)
    seen = 0
    for batch in source.take(num_samples, batch_size):
        outputs = run(batch if len(batch) > 1 else batch[0])
        outputs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
        for name, tensor in zip(names, outputs[n_out:]):
            observers[name].update(tensor.numpy())
        seen += batch[0].shape[0]
        bar.update(batch[0].shape[0])
    bar.close()
    chosen = {name: observers[name].range() for name in names}
    for group in _tie_groups(rewritten.tied_points):
        # One shared range, the union: equal scales and zero points.
        shared = (min(chosen[n][0] for n in group), max(chosen[n][1] for n in group))
        chosen.update({n: shared for n in group})
    ranges = {}
    for name in names:
        layer = rewritten.model.get_layer(name)
        layer.set_range(*chosen[name])
        ranges[name] = layer.get_range()
    for name in rewritten.fixed_points:
        ranges[name] = rewritten.model.get_layer(name).get_range()
    return Calibration(ranges, seen, time.perf_counter() - start, scheme.activations.method)


class _NoBar:
    def update(self, n):
        pass

    def close(self):
        pass


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


def _progress(total: int, enabled: bool):
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, desc="calibrating", unit="sample", file=sys.stderr, leave=False,
                disable=None)  # disable=None: off when stderr is not a terminal
