"""TFRecord files as calibration data: `tf.train.Example` records with one feature per model input.

    write_records("calib.tfrecord", {"image": x})            # x: (N, 32, 32, 3); one record per sample
    src = open_source("calib.tfrecord", specs)                # or "calib-*.tfrecord": the files in name order
    for batch in src.take(10000, 32): ...                     # streamed: memory does not grow with N

Each record holds, for each model input, a feature named like the input (a
model with one input may use any one feature name) with the sample's values
flattened, as a float list or an int64 list: what `write_records` writes and
what most data pipelines already produce.  The records are read by
`tf.data.TFRecordDataset`, parsed in batches, and never held all at once.
"""

from __future__ import annotations

import glob
import os
from typing import Sequence

import numpy as np

from qtoolkit.errors import DataError

EXTENSIONS = (".tfrecord", ".tfrecords", ".tfr")


def is_records(path: str) -> bool:
    """True for a TFRecord file name or a glob pattern of them."""
    return os.fspath(path).endswith(EXTENSIONS)


def files(pattern: str) -> list[str]:
    """The files a path or glob pattern names, sorted (the stream's order).

    Raises:
      DataError: when it names no file.
    """
    found = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else ([pattern] if os.path.isfile(pattern) else [])
    if not found:
        raise DataError(f"calibration data {pattern!r}: no such TFRecord file; give a .tfrecord path or a glob "
                        "pattern such as 'calib-*.tfrecord'")
    return found


def dataset(pattern: str, specs: Sequence, batch_size: int = 64):
    """A tf.data.Dataset of batches, a dict keyed by input name, parsed from the records of `pattern`.

    Raises:
      DataError: an unreadable file, or records without a feature for an input.
    """
    import tensorflow as tf

    paths = files(pattern)
    try:
        first = next(iter(tf.data.TFRecordDataset(paths[:1]).take(1)), None)
    except tf.errors.OpError as e:
        raise DataError(f"{paths[0]}: not a readable TFRecord file ({e.message.splitlines()[0]})") from None
    if first is None:
        raise DataError(f"{paths[0]}: no records")
    try:
        example = tf.train.Example.FromString(first.numpy())
    except Exception:  # noqa: BLE001  (protobuf's DecodeError; the message says what to give)
        raise DataError(f"{paths[0]}: the records are not tf.train.Example protos; write one Example per sample "
                        "with a float or int64 feature per input (qtoolkit.calibrate.write_records)") from None
    kinds = {name: f.WhichOneof("kind") for name, f in example.features.feature.items()}
    features = {}
    for name, shape, _ in specs:
        feature = name if name in kinds else (next(iter(kinds)) if len(specs) == 1 and len(kinds) == 1 else None)
        if feature is None:
            raise DataError(f"{paths[0]}: no feature named {name!r} (the model's input); the records have "
                            f"{', '.join(kinds) or 'no features'}")
        if kinds[feature] not in ("float_list", "int64_list"):
            raise DataError(f"{paths[0]}: feature {feature!r} is a {kinds[feature]}; give the input's values as a "
                            "float or int64 list")
        dtype = tf.float32 if kinds[feature] == "float_list" else tf.int64
        features[name] = (feature, tf.io.FixedLenFeature([int(d) for d in shape[1:]], dtype))

    def parse(serialized):
        parsed = tf.io.parse_example(serialized, {f: spec for f, spec in features.values()})
        return {name: parsed[f] for name, (f, _) in features.items()}

    return tf.data.TFRecordDataset(paths).batch(batch_size).map(parse)


def write_records(path: str, arrays) -> int:
    """Writes samples as TFRecords, one `tf.train.Example` per sample, one feature per input.

    Args:
      path: the .tfrecord file to write.
      arrays: {input name: array with samples on axis 0}.

    Returns:
      The number of records written.
    """
    import tensorflow as tf

    arrays = {k: np.asarray(v) for k, v in arrays.items()}
    n = len(next(iter(arrays.values())))
    with tf.io.TFRecordWriter(path) as writer:
        for i in range(n):
            feature = {}
            for name, a in arrays.items():
                flat = a[i].ravel()
                feature[name] = (tf.train.Feature(float_list=tf.train.FloatList(value=flat))
                                 if a.dtype.kind == "f" else tf.train.Feature(int64_list=tf.train.Int64List(value=flat)))
            writer.write(tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString())
    return n
