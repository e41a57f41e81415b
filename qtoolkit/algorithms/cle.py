"""Cross-layer equalization (Nagel et al. 2019, "Data-free quantization through
weight equalization and bias correction", section 4.1).

    pairs = cle.find_pairs(rewritten.model, relu6="relu")
    scales = cle.equalize(rewritten, relu6="relu")   # rescales both models in place
    absorbed = cle.absorb_high_bias(rewritten, stats) # then moves large biases into the next layer

For two consecutive layers y = f(W2 f(W1 x + b1) + b2) with f positively
homogeneous (linear, ReLU), dividing output channel c of W1 (and b1) by s_c
and multiplying input channel c of W2 by s_c keeps the function.  With
s_c = sqrt(r1_c / r2_c) (r = max |w| of the channel) both channels end up
with the range sqrt(r1_c r2_c), which balances the per-channel ranges so a
*per-tensor* weight grid fits every channel.  ReLU6 does not commute with the
scaling (its clip would have to become 6 / s_c per channel, which a TFLite
fused activation cannot express): `relu6="relu"` replaces the ReLU6 of an
equalized pair with ReLU (as AIMET and the paper do for MobileNetV2),
`relu6="skip"` leaves such pairs alone.

High-bias absorption (section 4.1.1): equalizing can leave a channel with a
large positive pre-activation mean beta (batch norm's shift, divided by s_c),
which widens the activation's range. Where a ReLU channel's pre-activation
z ~ N(beta, gamma^2) stays above c = max(0, beta - 3 |gamma|), relu(z) =
relu(z - c) + c, so c leaves the first layer's bias and W2 c enters the
second's; the function changes only for the ~0.1% of values below c.
"""

from __future__ import annotations

import numpy as np
import tf_keras as keras

from qtoolkit.algorithms.bias_correction import constant_response
from qtoolkit.rewrite.layers import FoldedConv, QuantizeActivation

RELU6_POLICIES = ("relu", "skip")
# Layers between the two convs of a pair that commute with a positive per-channel scale.
_PASS_THROUGH = (keras.layers.GlobalAveragePooling2D, keras.layers.ZeroPadding2D, keras.layers.MaxPooling2D,
                 keras.layers.AveragePooling2D, QuantizeActivation)
# Of those, the ones that commute with adding a per-channel constant (zero padding does not).
_SHIFT_THROUGH = (keras.layers.GlobalAveragePooling2D, keras.layers.MaxPooling2D, keras.layers.AveragePooling2D,
                  QuantizeActivation)


def output_ranges(kind: str, kernel: np.ndarray) -> np.ndarray:
    """max |w| per output channel of a FoldedConv kernel."""
    if kind == "depthwise":
        kernel = kernel.reshape(*kernel.shape[:2], -1)
    return np.abs(kernel).reshape(-1, kernel.shape[-1]).max(axis=0)


def input_ranges(kind: str, kernel: np.ndarray) -> np.ndarray:
    """max |w| per input channel of a FoldedConv kernel (depthwise: over its multiplier)."""
    axis = 0 if kind == "dense" else 2
    moved = np.moveaxis(np.abs(kernel), axis, 0)
    return moved.reshape(moved.shape[0], -1).max(axis=1)


def scale_output(kind: str, kernel: np.ndarray, bias: np.ndarray, s: np.ndarray):
    """Divides output channel c of (kernel, bias) by s_c."""
    if kind == "depthwise":
        return kernel / s.reshape(kernel.shape[2], kernel.shape[3]), bias / s
    return kernel / s, bias / s


def scale_input(kind: str, kernel: np.ndarray, s: np.ndarray) -> np.ndarray:
    """Multiplies input channel c of a kernel by s_c."""
    if kind == "dense":
        return kernel * s[:, None]
    return kernel * s[None, None, :, None]  # conv2d and depthwise: input channels on axis 2


def pair_scales(r1: np.ndarray, r2: np.ndarray) -> np.ndarray:
    """s_c = sqrt(r1_c / r2_c); 1 where a channel is all zeros (nothing to balance)."""
    s = np.ones_like(r1, dtype=np.float64)
    ok = (r1 > 0) & (r2 > 0)
    s[ok] = np.sqrt(r1[ok] / r2[ok])
    return s


def equalize_arrays(layers: list[tuple[str, np.ndarray, np.ndarray]], sweeps: int = 20):
    """Numpy reference: equalizes a chain of (kind, kernel, bias) layers.

    Args:
      layers: consecutive layers, layer i+1 reads layer i's output (channels match).
      sweeps: passes over the chain (the scales converge in a few).

    Returns:
      (new layers, per-pair cumulative scales).
    """
    layers = [(k, w.astype(np.float64), b.astype(np.float64)) for k, w, b in layers]
    total = [np.ones(layers[i][2].shape[0]) for i in range(len(layers) - 1)]
    for _ in range(sweeps):
        for i in range(len(layers) - 1):
            (k1, w1, b1), (k2, w2, b2) = layers[i], layers[i + 1]
            s = pair_scales(output_ranges(k1, w1), input_ranges(k2, w2))
            w1, b1 = scale_output(k1, w1, b1, s)
            layers[i], layers[i + 1] = (k1, w1, b1), (k2, scale_input(k2, w2, s), b2)
            total[i] = total[i] * s
    return layers, total


def _consumers(model: keras.Model) -> dict[int, list]:
    """id(tensor) -> (layer, node) pairs reading it; a layer shared with other models has one node per call."""
    readers: dict[int, list] = {}
    for layer in model.layers:
        for node in layer.inbound_nodes:
            for t in _flat(node.input_tensors):
                readers.setdefault(id(t), []).append((layer, node))
    return readers


def _flat(tensors):
    return list(tensors) if isinstance(tensors, (list, tuple)) else [tensors]


def _next_conv(layer, readers, through=_PASS_THROUGH):
    """The single FoldedConv reading `layer`'s output (through `through` layers), or None."""
    tensor = layer.output
    while True:
        users = readers.get(id(tensor), [])
        if len(users) != 1:
            return None
        nxt, node = users[0]
        if isinstance(nxt, FoldedConv):
            return nxt
        if not isinstance(nxt, through):
            return None
        tensor = _flat(node.output_tensors)[0]


def absorb_high_bias(rewritten, stats: dict, n_sigma: float = 3.0) -> dict[str, np.ndarray]:
    """High-bias absorption into the next layer, in place on both models (see module docstring).

    Applied to ReLU layers whose output reaches one FoldedConv through pooling
    or quantizers only, where the second layer sees no padding (1x1 kernels,
    'valid' padding, dense): there it is exact for every value above c.

    Args:
      rewritten: qtoolkit.rewrite result (after `equalize`, so ReLU6 pairs are ReLU).
      stats: FoldedConv name -> (beta, |gamma|) of its pre-activation, as
        `bias_correction.batch_norm_stats` (divided by the CLE scales).
      n_sigma: c = max(0, beta - n_sigma |gamma|).

    Returns:
      first layer name -> the per-channel constant c moved (channels with c > 0 only counted).
    """
    twin, qmodel = rewritten.float_model, rewritten.model
    readers = _consumers(qmodel)
    model_outputs = {id(t) for t in qmodel.outputs}
    moved = {}
    for layer in qmodel.layers:
        if not isinstance(layer, FoldedConv) or layer.activation != "relu" or layer.name not in stats \
                or id(layer.output) in model_outputs:
            continue
        nxt = _next_conv(layer, readers, _SHIFT_THROUGH)
        if nxt is None or (nxt.kind != "dense" and nxt.padding != "valid" and tuple(nxt.kernel_shape[:2]) != (1, 1)):
            continue
        beta, gamma = stats[layer.name]
        c = np.maximum(0.0, beta - n_sigma * gamma)
        if not np.any(c > 0):
            continue
        a, b = twin.get_layer(layer.name), twin.get_layer(nxt.name)
        a.bias.assign((a.bias.numpy() - c).astype(np.float32))
        b.bias.assign((b.bias.numpy() + constant_response(b.kind, b.kernel.numpy(), c)).astype(np.float32))
        for name in (layer.name, nxt.name):
            qmodel.get_layer(name).bias.assign(twin.get_layer(name).bias.numpy())
        moved[layer.name] = c
    return moved


def find_pairs(model: keras.Model, relu6: str = "relu") -> list[tuple[str, str]]:
    """(first, second) FoldedConv names of the rewritten (fake-quant) model that can be equalized.

    The first layer's output must feed only the second (through pooling or
    padding at most), its activation must be linear or ReLU (or ReLU6 when
    `relu6="relu"`), and the second must read all its channels as inputs.
    """
    if relu6 not in RELU6_POLICIES:
        raise ValueError(f"relu6 must be one of {', '.join(RELU6_POLICIES)}, got {relu6!r}")
    pairs = []
    model_outputs = {id(t) for t in model.outputs}
    readers = _consumers(model)
    for layer in model.layers:
        if not isinstance(layer, FoldedConv) or id(layer.output) in model_outputs:
            continue
        if layer.activation == "relu6" and relu6 == "skip":
            continue
        nxt = _next_conv(layer, readers)
        if nxt is None:
            continue
        in_channels = nxt.kernel_shape[0] if nxt.kind == "dense" else nxt.kernel_shape[2]
        if in_channels == layer.units:
            pairs.append((layer.name, nxt.name))
    return pairs


def equalize(rewritten, relu6: str = "relu", sweeps: int = 20) -> dict[str, np.ndarray]:
    """Equalizes every pair of the rewritten model and its float twin, in place.

    Both models get the same float kernels and biases (the float twin keeps
    computing what the quantized model approximates); ReLU6 of equalized
    pairs becomes ReLU when `relu6="relu"`; weight ranges are recalibrated.

    Returns:
      first layer name -> cumulative per-channel scale s (output divided by s).
    """
    twin, qmodel = rewritten.float_model, rewritten.model
    pairs = find_pairs(qmodel, relu6)
    scales = {}
    for _ in range(sweeps):
        for first, second in pairs:
            a, b = twin.get_layer(first), twin.get_layer(second)
            s = pair_scales(output_ranges(a.kind, a.kernel.numpy()), input_ranges(b.kind, b.kernel.numpy()))
            k1, b1 = scale_output(a.kind, a.kernel.numpy(), a.bias.numpy(), s)
            a.kernel.assign(k1.astype(np.float32))
            a.bias.assign(b1.astype(np.float32))
            b.kernel.assign(scale_input(b.kind, b.kernel.numpy(), s).astype(np.float32))
            scales[first] = scales.get(first, 1.0) * s
    for first, second in pairs:
        for name in (first, second):
            src, dst = twin.get_layer(name), qmodel.get_layer(name)
            dst.kernel.assign(src.kernel.numpy())
            dst.bias.assign(src.bias.numpy())
            dst.calibrate_weights()
        for model in (twin, qmodel):
            if model.get_layer(first).activation == "relu6":
                model.get_layer(first).activation = "relu"
    return scales
