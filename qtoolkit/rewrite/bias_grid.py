"""Biases on TFLite's int32 grid: the simulation adds the bias the file will add.

    snap_biases(rewritten.model)     # after calibration: every range is known

TFLite stores a conv / depthwise / fully-connected bias as int32 codes with scale s_in · s_w (the input's
scale times each channel's weight scale) and adds it to the exact integer accumulator. The fake-quant
simulation adds the float bias instead; the difference, up to half a code, is 0.2–0.4% of an output step
with 8-bit weights and 4–8% with 4-bit weights (measured on the digits MobileNet), and values that lie that
close to a rounding boundary round the other way in the file. Snapping each bias to its grid once the ranges
are final makes the simulation add exactly what the file adds (scripts/bench_faithful.py measures the rest).
"""

from __future__ import annotations

import numpy as np

from qtoolkit import quantizers as q
from qtoolkit.rewrite.graph import inbound_layers
from qtoolkit.rewrite.layers import FoldedConv, QuantizeActivation

# Layers between a quantizer and a conv that keep the quantizer's scale in the file (no requantization).
_SAME_SCALE = ("ZeroPadding", "Reshape", "Flatten", "MaxPooling", "Cropping", "Permute")


def snap_biases(model) -> int:
    """Rounds each quantized conv's bias to its int32 grid s_in · s_w; returns how many layers were snapped.

    A layer whose input scale cannot be traced to one quantizer through scale-keeping layers is left alone.
    """
    snapped = 0
    for layer in model.layers:
        if not isinstance(layer, FoldedConv) or layer.weight_quantizer is None or not layer.built:
            continue
        source = _input_quantizer(layer)
        if source is None or source.quantizer.bits > 8:
            continue
        s_in = _scale(source.range["min"].numpy(), source.range["max"].numpy(), source.quantizer)
        s_w = _scale(layer.kernel_range["min"].numpy(), layer.kernel_range["max"].numpy(), layer.weight_quantizer)
        grid = np.float64(s_in) * np.broadcast_to(np.asarray(s_w, np.float64), layer.bias.shape)
        if not np.all(grid > 0):
            continue
        bias = layer.bias.numpy().astype(np.float64)
        layer.bias.assign((np.round(bias / grid) * grid).astype(np.float32))
        snapped += 1
    return snapped


def _scale(lo, hi, quantizer) -> np.ndarray:
    """The nudged scale of a range, as TensorFlow's fake quant (and so the converter) computes it."""
    _, _, scale, _, _ = q.nudge(lo, hi, 1 if quantizer.narrow_range else 0, (1 << quantizer.bits) - 1)
    return np.asarray(scale, np.float64)


def _input_quantizer(layer):
    """The QuantizeActivation whose scale `layer`'s input has in the file, or None."""
    current = layer
    for _ in range(8):
        inbound = inbound_layers(current)
        if len(inbound) != 1:
            return None
        inbound = inbound[0]
        if isinstance(inbound, QuantizeActivation):
            return inbound
        if inbound is None or not type(inbound).__name__.startswith(_SAME_SCALE):
            return None
        current = inbound
    return None
