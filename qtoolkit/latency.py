"""Latency of a TFLite model with the LiteRT interpreter (default XNNPACK delegate).

    ms = latency.median_ms(tflite_bytes, threads=1)

Batch 1, random input of the model's own dtype, `warmup` invokes first, then
the median of `runs` invokes.  Compare models measured in the same process
run, side by side; absolute times vary from machine to machine and run to run.
"""

from __future__ import annotations

import time

import numpy as np


def median_ms(model: bytes, threads: int = 1, runs: int = 50, warmup: int = 5, seed: int = 0) -> float:
    """Median wall time of one invoke, in milliseconds."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=bytes(model), num_threads=threads)
    for d in interpreter.get_input_details():
        shape = [1, *d["shape_signature"][1:]]
        if any(s < 0 for s in shape):
            raise ValueError(f"input {d['name']} has an unknown dimension {shape}; cannot time it")
        interpreter.resize_tensor_input(d["index"], shape, strict=False)
    interpreter.allocate_tensors()
    rng = np.random.default_rng(seed)
    for d in interpreter.get_input_details():
        dtype = d["dtype"]
        if np.issubdtype(dtype, np.integer):
            info = np.iinfo(dtype)
            x = rng.integers(info.min, info.max, d["shape"], endpoint=True).astype(dtype)
        else:
            x = rng.uniform(-1, 1, d["shape"]).astype(dtype)
        interpreter.set_tensor(d["index"], x)
    for _ in range(warmup):
        interpreter.invoke()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        interpreter.invoke()
        times.append(time.perf_counter() - start)
    return 1000.0 * float(np.median(times))
