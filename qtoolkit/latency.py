"""Latency of a TFLite model with the LiteRT interpreter (default XNNPACK delegate).

    ms = latency.median_ms(tflite_bytes, threads=1)                  # no samples: see below
    ms = latency.median_ms(tflite_bytes, inputs=[x_test[:1]])        # one real sample per model input

Batch 1, `warmup` invokes first, then the median of `runs` invokes.  The inputs
are the first sample of `inputs` (one array per model input, in the file's
input order, real-valued: quantized inputs are quantized with the file's own
scale and zero point, as `verify.LiteRTModel` does) or, without samples,
uniform values in [-1, 1] for float and quantized inputs and zeros for plain
integer inputs (token ids: an index over the full int32 range would be out of
an Embedding's table, and TFLite's GATHER fails on it; zero is always a valid
id).  Compare models measured in the same process run, side by side; absolute
times vary from machine to machine and run to run.
"""

from __future__ import annotations

import time
from typing import Optional, Sequence

import numpy as np


def median_ms(model: bytes, threads: int = 1, runs: int = 50, warmup: int = 5, seed: int = 0,
              inputs: Optional[Sequence[np.ndarray] | np.ndarray] = None) -> float:
    """Median wall time of one invoke, in milliseconds.

    Args:
      model: the TFLite flatbuffer.
      threads: interpreter threads.
      runs: timed invokes.
      warmup: untimed invokes before them.
      seed: of the random values fed without `inputs`.
      inputs: samples (an array, or one per model input in the file's input order); the first is fed.

    Returns:
      The median of `runs` invoke times, in milliseconds.

    Raises:
      ValueError: an input has an unknown dimension besides the batch, or `inputs` has the wrong count.
    """
    from ai_edge_litert.interpreter import Interpreter

    from qtoolkit.verify import _to_tensor

    interpreter = Interpreter(model_content=bytes(model), num_threads=threads)
    details = interpreter.get_input_details()
    for d in details:
        shape = [1, *d["shape_signature"][1:]]
        if any(s < 0 for s in shape):
            raise ValueError(f"input {d['name']} has an unknown dimension {shape}; cannot time it")
        interpreter.resize_tensor_input(d["index"], shape, strict=False)
    interpreter.allocate_tensors()
    if inputs is not None:
        arrays = list(inputs) if isinstance(inputs, (list, tuple)) else [inputs]
        if len(arrays) != len(details):
            raise ValueError(f"the model has {len(details)} inputs, got {len(arrays)} arrays")
    rng = np.random.default_rng(seed)
    for i, d in enumerate(interpreter.get_input_details()):
        if inputs is not None:
            x = _to_tensor(np.asarray(arrays[i][:1]), d)
        elif np.issubdtype(d["dtype"], np.integer) and not d["quantization"][0]:
            x = np.zeros(d["shape"], d["dtype"])  # ids: zero is in every table
        else:
            x = _to_tensor(rng.uniform(-1, 1, d["shape"]).astype(np.float32), d)
        interpreter.set_tensor(d["index"], x)
    for _ in range(warmup):
        interpreter.invoke()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        interpreter.invoke()
        times.append(time.perf_counter() - start)
    return 1000.0 * float(np.median(times))
