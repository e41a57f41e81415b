"""AdaRound (Nagel et al. 2020, "Up or down? Adaptive rounding for post-training quantization").

    times = adaround.adaround(rewritten, x_calibration, iterations=1000)

Layer by layer, instead of rounding each weight to nearest, learn whether it
rounds down (floor) or up: W~ = s * clip(floor(W / s) + h(V), qmin, qmax) with
the rectified sigmoid h(V) = clip(sigmoid(V) (zeta - gamma) + gamma, 0, 1),
minimising the layer's output reconstruction error
|| f(W x + b) - f(W~ x~ + b) ||^2 plus lambda * sum(1 - |2 h(V) - 1|^beta), where
beta anneals from 20 to 2 after a warm-up without regularization (the paper's
schedule), which pushes every h(V) to 0 or 1.  x is the layer's input in the
float model and x~ in the quantized model with the layers before it already
rounded (the paper's asymmetric reconstruction).  The result is on the same
grid as nearest rounding and within one step of the float weight.
"""

from __future__ import annotations

import time

import numpy as np
import tensorflow as tf
import tf_keras as keras

from qtoolkit import quantizers as q
from qtoolkit.rewrite.layers import FoldedConv, activate, conv_op

ZETA, GAMMA = 1.1, -0.1
DEFAULT_ITERATIONS = 1000


def grid_of(layer: FoldedConv):
    """(scale broadcastable to the kernel, qmin, qmax) of a FoldedConv's symmetric weight grid."""
    wq = layer.weight_quantizer
    lo = layer.kernel_range["min"].numpy()
    hi = layer.kernel_range["max"].numpy()
    p = q.qparams(lo, hi, wq.bits, symmetric=wq.symmetric, narrow_range=wq.narrow_range)
    if np.any(np.asarray(p.zero_point) != 0):
        raise ValueError(f"{layer.name}: AdaRound needs a symmetric weight grid (zero-point 0)")
    scale = np.asarray(p.scale, np.float32)
    if layer.kind == "depthwise" and scale.ndim == 1:
        scale = scale.reshape(layer.kernel_shape[2], layer.kernel_shape[3])
    return scale, p.qmin, p.qmax


def rectified_sigmoid(v):
    return tf.clip_by_value(tf.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def init_v(rest: np.ndarray) -> np.ndarray:
    """V with h(V) = rest (the fractional part), so training starts from the float weight."""
    rest = np.clip(rest, 1e-4, 1 - 1e-4)
    return -np.log((ZETA - GAMMA) / (rest - GAMMA) - 1).astype(np.float32)


def round_layer(kind: str, kernel: np.ndarray, bias: np.ndarray, scale: np.ndarray, qmin: int, qmax: int,
                x_q: np.ndarray, y_float: np.ndarray, activation: str = "linear", conv_args=None,
                iterations: int = DEFAULT_ITERATIONS, reg: float = 0.01, beta=(20.0, 2.0), warmup: float = 0.2,
                batch_size: int = 32, learning_rate: float = 1e-2, seed: int = 0) -> np.ndarray:
    """Learns the rounding of one layer; returns the integer codes (same shape as `kernel`).

    Args:
      kind, kernel, bias: the layer ("conv2d", "depthwise" or "dense").
      scale, qmin, qmax: its weight grid (scale broadcasts against the kernel).
      x_q: the layer's inputs in the quantized model, [N, ...].
      y_float: the float layer's outputs (after its activation) for the same samples.
      activation: the fused activation ("linear", "relu", "relu6").
      conv_args: strides, padding, dilation_rate for conv kinds.
      iterations: optimisation steps (Adam), batch_size samples each.
      reg: lambda of the rounding regulariser.
      beta: (start, end) of the annealed exponent.
      warmup: fraction of iterations without the regulariser.
    """
    conv_args = conv_args or {"strides": (1, 1), "padding": "valid", "dilation_rate": (1, 1)}
    w_floor = np.floor(kernel / scale).astype(np.float32)
    v = tf.Variable(init_v(kernel / scale - w_floor))
    w_floor_t, scale_t = tf.constant(w_floor), tf.constant(scale)
    bias_t = tf.constant(bias.astype(np.float32))
    opt = keras.optimizers.Adam(learning_rate)
    x_all, y_all = tf.constant(x_q), tf.constant(y_float)
    n = x_q.shape[0]
    warm = int(warmup * iterations)

    def soft_kernel():
        return scale_t * tf.clip_by_value(w_floor_t + rectified_sigmoid(v), qmin, qmax)

    @tf.function
    def step(idx, b, lam):
        x, y = tf.gather(x_all, idx), tf.gather(y_all, idx)
        with tf.GradientTape() as tape:
            out = activate(tf.nn.bias_add(conv_op(kind, x, soft_kernel(), conv_args["strides"],
                                                  conv_args["padding"], conv_args["dilation_rate"]), bias_t),
                           activation)
            # AIMET's reconstruction loss: squared error summed over channels, mean over samples/positions.
            rec = tf.reduce_mean(tf.reduce_sum(tf.square(out - y), axis=-1))
            h = rectified_sigmoid(v)
            round_loss = lam * tf.reduce_sum(1.0 - tf.pow(tf.abs(2.0 * h - 1.0), b))
            loss = rec + round_loss
        opt.apply_gradients([(tape.gradient(loss, v), v)])
        return rec

    rng = np.random.default_rng(seed)
    for i in range(iterations):
        idx = rng.choice(n, size=min(batch_size, n), replace=False)
        if i < warm:
            b, lam = beta[0], 0.0
        else:
            frac = (i - warm) / max(1, iterations - warm)
            b, lam = beta[0] - (beta[0] - beta[1]) * frac, reg  # linear decay, as AIMET
        step(tf.constant(idx), tf.constant(b, tf.float32), tf.constant(lam, tf.float32))
    return np.clip(w_floor + (v.numpy() >= 0).astype(np.float32), qmin, qmax)


def adaround(rewritten, inputs, iterations: int = DEFAULT_ITERATIONS, reg: float = 0.01, batch_size: int = 32,
             max_samples: int = 512, log=None) -> dict[str, float]:
    """AdaRound on every weight-quantized FoldedConv of `rewritten.model`, in graph order, in place.

    Activation ranges must be calibrated (the inputs x~ come from the
    quantized model).  Each kernel is replaced by its rounded values
    (scale * codes), which the fake-quant and the exporter keep exactly.

    Args:
      rewritten: rewrite.Rewritten.
      inputs: calibration inputs, one array per model input.
      iterations, reg, batch_size: see `round_layer`.
      max_samples: calibration samples used (memory: layer inputs are held).
      log: function taking progress messages, or None.

    Returns:
      layer name -> seconds, plus "total".
    """
    twin, qmodel = rewritten.float_model, rewritten.model
    inputs = [a[:max_samples] for a in inputs]
    feed = inputs if len(inputs) > 1 else inputs[0]
    times = {}
    start = time.perf_counter()
    for layer in qmodel.layers:
        if not isinstance(layer, FoldedConv) or layer.weight_quantizer is None:
            continue
        t0 = time.perf_counter()
        x_q = keras.Model(qmodel.inputs, layer.input).predict(feed, batch_size=128, verbose=0)
        y_f = keras.Model(twin.inputs, twin.get_layer(layer.name).output).predict(feed, batch_size=128, verbose=0)
        scale, qmin, qmax = grid_of(layer)
        kernel = layer.kernel.numpy()
        codes = round_layer(layer.kind, kernel, layer.bias.numpy(), scale, qmin, qmax, x_q, y_f, layer.activation,
                            {"strides": layer.strides, "padding": layer.padding, "dilation_rate": layer.dilation_rate},
                            iterations, reg, batch_size=batch_size)
        layer.kernel.assign((codes * scale).astype(np.float32))
        times[layer.name] = time.perf_counter() - t0
        if log:
            log(f"adaround {layer.name}: {kernel.size} weights, {times[layer.name]:.1f} s")
    times["total"] = time.perf_counter() - start
    return times
