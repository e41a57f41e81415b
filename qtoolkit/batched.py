"""A Keras model called eagerly on samples in batches: one array per model output.

    outputs = run_batched(rewritten.float_model, [x])      # x: samples on axis 0, one array per input

Eager, not `model.predict`: a fake-quant layer's `enabled` flag (the debugger's) is read at every call.
"""

from __future__ import annotations

import numpy as np


def run_batched(model, samples, batch_size=64) -> list:
    """Eager batched call (quantizers' `enabled` is read at each call); returns one array per model output."""
    x = samples
    n = x[0].shape[0]
    outs = None
    for i in range(0, n, batch_size):
        batch = [a[i:i + batch_size] for a in x]
        y = model(batch if len(batch) > 1 else batch[0], training=False)
        y = [t.numpy() for t in (y if isinstance(y, (list, tuple)) else [y])]
        outs = [[t] for t in y] if outs is None else [o + [t] for o, t in zip(outs, y)]
    return [np.concatenate(o) for o in outs]
