"""Calibration in parts: shards of one stream observed in separate processes, merged into one pass's ranges.

    # process i of n (same model, scheme, data and sample count everywhere):
    prepared = prepare(model, "calib.tfrecord", "int8", num_calibration_samples=10000, calibration_shard=(i, n))
    prepared.calibration_part.save(f"part{i}.npz")
    # then, anywhere:
    result = ptq(model, "calib.tfrecord", "int8", calibration_parts=["part0.npz", "part1.npz"])

Shard i of n is a contiguous block of whole batches of the stream (`block`),
so the parts concatenate back into the stream.  Each part holds its observers'
state (`observers.to_state`): min/max, the EMA's batch extremes, histograms on
an exact power-of-two grid; `merge_parts` merges them in stream order into what
one pass over all the samples would have observed, so the ranges are the same
(tests/test_shards.py).  For the "auto" method the part that holds the last
(held-out) samples also keeps them, and the observers before them: the choice
between min/max and MSE is then made once, where the parts are merged.

A part is an `.npz` file: its facts as JSON (`meta`) and its arrays, no pickle.
Every part carries a fingerprint of what it was computed with (the scheme, the
rewritten model's quantizers and weights, the sample and batch counts): parts
of different runs do not merge.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Sequence

import numpy as np

from qtoolkit.calibrate import calibrator, observers
from qtoolkit.errors import DataError

FORMAT = "qtoolkit.calibration_part/1"


@dataclasses.dataclass
class CalibrationPart:
    """What one shard (or several merged) of a calibration stream observed.

    Attributes:
      fingerprint: of the scheme, the rewritten model, the total sample count and the batch size.
      method: the activation range method.
      total: samples of the whole calibration pass (every part).
      batch_size: calibration batch size (shard blocks are whole batches).
      shards: n, the number of shards the stream was cut into.
      indices: the shard indices this part holds (one for a shard; all of them once merged).
      observed: the observers' state (`calibrator.Observed`).
    """

    fingerprint: str
    method: str
    total: int
    batch_size: int
    shards: int
    indices: tuple
    observed: calibrator.Observed

    @property
    def complete(self) -> bool:
        return tuple(self.indices) == tuple(range(self.shards))

    def save(self, path: str) -> None:
        """Writes the part as an .npz (atomically: a complete file or none)."""
        from qtoolkit.export import write_atomic
        import io

        arrays: dict = {}
        meta = {"format": FORMAT, **{k: getattr(self, k) for k in
                                     ("fingerprint", "method", "total", "batch_size", "shards")},
                "indices": list(self.indices), "samples": self.observed.samples,
                "observers": {n: _pack(observers.to_state(o), f"o/{n}", arrays)
                              for n, o in self.observed.observers.items()},
                "before_holdout": None if self.observed.before_holdout is None else
                {n: _pack(observers.to_state(o), f"b/{n}", arrays) for n, o in self.observed.before_holdout.items()},
                "holdout_inputs": None if self.observed.holdout_inputs is None else
                len(self.observed.holdout_inputs)}
        for i, x in enumerate(self.observed.holdout_inputs or []):
            arrays[f"h/{i}"] = x
        buffer = io.BytesIO()
        np.savez(buffer, meta=np.array(json.dumps(meta)), **arrays)
        write_atomic(path, buffer.getvalue())


def load_part(path) -> CalibrationPart:
    """Reads a part written by `CalibrationPart.save`; a part object is returned as it is.

    Raises:
      DataError: a missing or unreadable file, or not a calibration part.
    """
    if isinstance(path, CalibrationPart):
        return path
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataError(f"calibration part {path!r} does not exist; give the .npz files that "
                        "`python -m qtoolkit.calibrate --calibration_shard i/n` wrote")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
        meta = json.loads(str(arrays.pop("meta")))
    except (OSError, ValueError, KeyError) as e:
        raise DataError(f"{path}: not a readable calibration part ({str(e).splitlines()[0]}); give the .npz files "
                        "that `python -m qtoolkit.calibrate --calibration_shard i/n` wrote") from None
    if meta.get("format") != FORMAT:
        raise DataError(f"{path}: not a qtoolkit calibration part (format {meta.get('format')!r}, expected "
                        f"{FORMAT!r})")
    states = {n: observers.from_state(_unpack(s, arrays)) for n, s in meta["observers"].items()}
    before = None if meta["before_holdout"] is None else \
        {n: observers.from_state(_unpack(s, arrays)) for n, s in meta["before_holdout"].items()}
    holdout = None if meta["holdout_inputs"] is None else [arrays[f"h/{i}"] for i in range(meta["holdout_inputs"])]
    observed = calibrator.Observed(states, before, holdout, int(meta["samples"]))
    return CalibrationPart(meta["fingerprint"], meta["method"], int(meta["total"]), int(meta["batch_size"]),
                           int(meta["shards"]), tuple(meta["indices"]), observed)


def merge_parts(parts: Sequence) -> CalibrationPart:
    """The parts (objects or paths) merged in stream order into one; they must come from the same run.

    Raises:
      DataError: parts of different runs (fingerprints), a shard given twice, or no parts.
    """
    parts = [load_part(p) for p in parts]
    if not parts:
        raise DataError("no calibration parts given; give the .npz files the shards wrote")
    first = parts[0]
    for p in parts[1:]:
        if (p.fingerprint, p.shards) != (first.fingerprint, first.shards):
            raise DataError("the calibration parts come from different runs (another model, scheme, sample count or "
                            "batch size, or another number of shards); calibrate every shard with the same "
                            "--model, --scheme, --calibration_data, --num_calibration_samples and --batch_size")
    indices = sorted(i for p in parts for i in p.indices)
    if len(set(indices)) != len(indices):
        twice = sorted({i for i in indices if indices.count(i) > 1})
        raise DataError(f"shard {twice[0]}/{first.shards} is given twice; give each shard's part once")
    parts.sort(key=lambda p: min(p.indices))
    observed = calibrator.merge([p.observed for p in parts])
    return dataclasses.replace(first, indices=tuple(indices), observed=observed)


def block(shard: tuple, total: int, batch_size: int) -> tuple[int, int]:
    """Samples [start, stop) of shard (i, n): the i-th of n runs of whole batches of a `total`-sample pass."""
    i, n = shard
    batches = -(-total // batch_size)
    return min(i * batches // n * batch_size, total), min((i + 1) * batches // n * batch_size, total)


def parse_shard(text) -> tuple[int, int]:
    """(i, n) from "i/n" (or a pair), checked: 0 <= i < n.

    Raises:
      DataError: naming the flag and the form expected.
    """
    try:
        i, n = (int(v) for v in (text.split("/") if isinstance(text, str) else text))
    except (ValueError, TypeError, AttributeError):
        raise DataError(f"--calibration_shard must look like i/n (shard i of n, from 0), got {text!r}") from None
    if not 0 <= i < n:
        raise DataError(f"--calibration_shard {i}/{n}: i must be from 0 to {n - 1}")
    return i, n


def fingerprint(rewritten, scheme, total: int, batch_size: int) -> str:
    """What must be the same for parts to merge: scheme, quantizers, ties, float weights, samples, batch size."""
    h = hashlib.sha256()
    h.update(json.dumps([scheme.to_dict(), list(rewritten.quant_points), sorted(map(list, rewritten.tied_points)),
                         total, batch_size], sort_keys=True, default=str).encode())
    for w in rewritten.float_model.weights:
        h.update(np.ascontiguousarray(w.numpy()).tobytes())
    return h.hexdigest()[:16]


def observe_shard(rewritten, source, total: int, scheme, batch_size: int, shard: tuple,
                  progress: bool = True) -> CalibrationPart:
    """Observes shard (i, n) of the `total` calibration samples of `source` (read from its start)."""
    start, stop = block(shard, total, batch_size)
    source.skip(start)
    observed = calibrator.observe(rewritten, source, total, scheme, batch_size, progress, block=(start, stop))
    return CalibrationPart(fingerprint(rewritten, scheme, total, batch_size), scheme.activations.method, total,
                           batch_size, shard[1], (shard[0],), observed)


def assign_parts(rewritten, parts: Sequence, total: int, scheme, batch_size: int,
                 progress: bool = True) -> calibrator.Calibration:
    """Sets the ranges the merged parts give on `rewritten.model`, as one pass over their samples would.

    Raises:
      DataError: parts of another run than this one, or shards missing.
    """
    merged = merge_parts(parts)
    if merged.fingerprint != fingerprint(rewritten, scheme, total, batch_size):
        raise DataError(f"the calibration parts were computed with another model, scheme, sample count "
                        f"({merged.total} samples) or batch size ({merged.batch_size}) than this run; give the same "
                        "--scheme, --num_calibration_samples and --batch_size as the shards")
    if not merged.complete:
        missing = sorted(set(range(merged.shards)) - set(merged.indices))
        raise DataError(f"calibration shard(s) {', '.join(f'{i}/{merged.shards}' for i in missing)} missing; "
                        "give every shard's part")
    return dataclasses.replace(calibrator.assign(rewritten, merged.observed, scheme, progress), shards=merged.shards)


def _pack(state: dict, prefix: str, arrays: dict) -> dict:
    """`state` with its arrays moved into `arrays` (keys under `prefix`), the rest JSON-ready."""
    out = {}
    for key, value in state.items():
        if isinstance(value, dict):
            out[key] = _pack(value, f"{prefix}/{key}", arrays)
        elif isinstance(value, np.ndarray):
            arrays[f"{prefix}/{key}"] = value
            out[key] = {"array": f"{prefix}/{key}"}
        else:
            out[key] = value.item() if isinstance(value, np.generic) else value
    return out


def _unpack(state: dict, arrays: dict) -> dict:
    out = {}
    for key, value in state.items():
        if isinstance(value, dict) and set(value) == {"array"}:
            out[key] = arrays[value["array"]]
        elif isinstance(value, dict):
            out[key] = _unpack(value, arrays)
        else:
            out[key] = value
    return out


def check(scheme, own_calibration: bool, needs_data: bool) -> None:
    """Raises DataError where calibration in parts does not apply.

    Args:
      scheme: the scheme.
      own_calibration: qtoolkit calibrates (a Keras model, fake-quant activations).
      needs_data: an algorithm of the scheme reads the calibration samples themselves.
    """
    if not own_calibration:
        raise DataError(f"calibration in parts is qtoolkit's own calibration pass; with scheme {scheme.name!r} on "
                        "this model there is none (weight-only schemes have no activation ranges; int16x8 and "
                        "SavedModels without Keras metadata are calibrated by the TFLite converter): calibrate "
                        "in one process")
    if needs_data:
        raise DataError(f"scheme {scheme.name!r} runs algorithms that read the calibration samples themselves "
                        "(adaround, empirical bias correction): they cannot be calibrated in parts; turn them off "
                        "or calibrate in one process")


def in_parts(rewritten, source, total: int, scheme, batch_size: int, progress: bool, shard, parts):
    """`prepare`'s calibration in parts: (None, this shard's part) or (the merged ranges' Calibration, None).

    The source is left after the `total` calibration samples when parts are merged, as after one pass.
    """
    if shard is not None and parts:
        raise DataError("give calibration_shard (observe one shard) or calibration_parts (merge them), not both")
    if shard is not None:
        return None, observe_shard(rewritten, source, total, scheme, batch_size, parse_shard(shard), progress)
    calibration = assign_parts(rewritten, parts, total, scheme, batch_size, progress)
    source.skip(total)
    return calibration, None
