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

How it runs fast (docs/algorithms.md, "Cost"): the layer inputs come from one
pass through each model that pauses before every layer (`layer_inputs`); a
convolution is optimised as a matrix product over rows, one row per output
position (its receptive field, `rows.py`), sampled across all samples and
positions; the whole loop of one layer is one TensorFlow graph (a
`tf.while_loop` with Adam written out), shared by the layers of one form; and
the loop stops once every h(V) is exactly 0 or 1 after the warm-up, from where
no gradient can change the rounding.
"""

from __future__ import annotations

import math
import time

import numpy as np
import tensorflow as tf

from qtoolkit import quantizers as q
from qtoolkit._progress import progress_bar
from qtoolkit.algorithms import rows as _rows
from qtoolkit.algorithms.layer_inputs import LayerInputs
from qtoolkit.rewrite.layers import FoldedConv, activate

ZETA, GAMMA = 1.1, -0.1
DEFAULT_ITERATIONS = 1000
# |V| beyond which h(V) is clipped to exactly 0 or 1 (sigmoid(V) (zeta - gamma) + gamma outside [0, 1]):
# its gradient is zero there, from the reconstruction and the regulariser alike.
SATURATED = math.log((ZETA - GAMMA) / -GAMMA - 1) + 1e-3
MAX_ROWS = 1024  # output positions per step at most (measured: docs/algorithms.md, "Cost")
ADAM = (0.9, 0.999, 1e-7)  # beta_1, beta_2, epsilon of Keras' Adam, written out in the loop


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


def _optimise(rows, targets, w_floor, scale, bias, v, qmin, qmax, reg, beta_start, beta_end, warm, iterations,
              batch, seed, learning_rate, form: str, activation: str, full: bool):
    """The optimisation loop of one layer in the row form; returns (iterations run, V)."""
    count = tf.shape(rows)[0]
    b1, b2, eps = ADAM

    def body(i, v, m, s):
        if full:
            x, y = rows, targets
        else:
            idx = tf.random.stateless_uniform([batch], tf.stack([seed, i]), 0, count, tf.int32)
            x, y = tf.gather(rows, idx), tf.gather(targets, idx)
        frac = tf.cast(tf.maximum(i - warm, 0), tf.float32) / tf.cast(tf.maximum(iterations - warm, 1), tf.float32)
        exponent = beta_start - (beta_start - beta_end) * frac  # linear decay after the warm-up, as AIMET
        lam = tf.where(i < warm, 0.0, reg)
        with tf.GradientTape() as tape:
            tape.watch(v)
            h = rectified_sigmoid(v)
            out = activate(_rows.forward(x, scale * tf.clip_by_value(w_floor + h, qmin, qmax), form) + bias,
                           activation)
            # AIMET's reconstruction loss: squared error summed over channels, mean over rows.
            loss = (tf.reduce_mean(tf.reduce_sum(tf.square(out - y), axis=-1))
                    + lam * tf.reduce_sum(1.0 - tf.pow(tf.abs(2.0 * h - 1.0), exponent)))
        g = tape.gradient(loss, v)
        m = m + (g - m) * (1 - b1)
        s = s + (g * g - s) * (1 - b2)
        t = tf.cast(i + 1, tf.float32)
        v = v - learning_rate * tf.sqrt(1 - b2 ** t) / (1 - b1 ** t) * m / (tf.sqrt(s) + eps)
        return i + 1, v, m, s

    def cond(i, v, m, s):
        converged = tf.logical_and(i > warm, tf.reduce_all(tf.abs(v) >= SATURATED))
        return tf.logical_and(i < iterations, tf.logical_not(converged))

    zeros = tf.zeros_like(v)
    i, v, _, _ = tf.while_loop(cond, body, (tf.constant(0), v, zeros, zeros))
    return i, v


_LOOPS: dict = {}


def _loop(form: str, activation: str, full: bool):
    """One traced graph per row form and activation, shared by the layers: shapes are left open."""
    key = (form, activation, full)
    if key not in _LOOPS:
        rank = 3 if form.startswith("depthwise") else 2
        spec = lambda r, dtype=tf.float32: tf.TensorSpec([None] * r, dtype)  # noqa: E731
        signature = [spec(rank), spec(2), spec(rank), spec(rank), spec(1), spec(rank), *[spec(0)] * 5,
                     *[spec(0, tf.int32)] * 4, spec(0)]

        def loop(*args):
            return _optimise(*args, form=form, activation=activation, full=full)

        _LOOPS[key] = tf.function(loop, input_signature=signature)
    return _LOOPS[key]


def round_layer(kind: str, kernel: np.ndarray, bias: np.ndarray, scale: np.ndarray, qmin: int, qmax: int,
                x_q, y_float, activation: str = "linear", conv_args=None,
                iterations: int = DEFAULT_ITERATIONS, reg: float = 0.01, beta=(20.0, 2.0), warmup: float = 0.2,
                batch_size: int = 32, learning_rate: float = 1e-2, seed: int = 0, max_rows: int = MAX_ROWS,
                stats: dict | None = None) -> np.ndarray:
    """Learns the rounding of one layer; returns the integer codes (same shape as `kernel`).

    Args:
      kind, kernel, bias: the layer ("conv2d", "conv1d", "depthwise" or "dense").
      scale, qmin, qmax: its weight grid (scale broadcasts against the kernel).
      x_q: the layer's inputs in the quantized model, [N, ...].
      y_float: the float layer's outputs (after its activation) for the same samples.
      activation: the fused activation ("linear", "relu", "relu6").
      conv_args: strides, padding, dilation_rate for conv kinds.
      iterations: optimisation steps (Adam) at most; the loop stops earlier once every h(V) is 0 or 1.
      reg: lambda of the rounding regulariser.
      beta: (start, end) of the annealed exponent.
      warmup: fraction of iterations without the regulariser.
      batch_size: samples per step: each step draws batch_size * (output positions per sample) rows, at most
        `max_rows`, at random over all samples and positions.
      seed: of the row sampling.
      stats: if given, receives "iterations" (run) and "rows" (per step).
    """
    conv_args = conv_args or {"strides": (1, 1), "padding": "valid", "dilation_rate": (1, 1)}
    scale = np.broadcast_to(np.asarray(scale, np.float32), kernel.shape)
    w_floor = np.floor(kernel / scale).astype(np.float32)
    v0 = init_v(kernel / scale - w_floor)
    rng = np.random.default_rng(seed)
    rows, targets, per_sample = _rows.layer_rows(kind, kernel.shape, x_q, y_float, conv_args, rng)
    form = _rows.form(kind, kernel.shape)
    batch = int(min(batch_size * per_sample, max_rows, rows.shape[0]))
    full = batch == rows.shape[0]
    matrix = lambda a: tf.constant(_rows.kernel_matrix(kind, np.ascontiguousarray(a)))  # noqa: E731
    warm = int(warmup * iterations)
    ran, v = _loop(form, activation, full)(
        rows, targets, matrix(w_floor), matrix(scale), tf.constant(bias.astype(np.float32)), matrix(v0),
        tf.constant(float(qmin)), tf.constant(float(qmax)), tf.constant(float(reg)), tf.constant(float(beta[0])),
        tf.constant(float(beta[1])), tf.constant(warm), tf.constant(int(iterations)), tf.constant(batch),
        tf.constant(int(seed)), tf.constant(float(learning_rate)))
    if stats is not None:
        stats.update(iterations=int(ran), rows=batch)
    v = _rows.kernel_array(kind, v.numpy(), kernel.shape)
    return np.clip(w_floor + (v >= 0).astype(np.float32), qmin, qmax)


def adaround(rewritten, inputs, iterations: int = DEFAULT_ITERATIONS, reg: float = 0.01, batch_size: int = 32,
             max_samples: int = 512, log=None, progress: bool = True) -> dict[str, float]:
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
      progress: show a progress bar of the layers on stderr (when it is a terminal).

    Returns:
      layer name -> seconds, plus "total".
    """
    twin, qmodel = rewritten.float_model, rewritten.model
    inputs = [np.asarray(a[:max_samples], np.float32) for a in inputs]
    layers = [layer for layer in qmodel.layers
              if isinstance(layer, FoldedConv) and layer.weight_quantizer is not None]
    quantized = LayerInputs(qmodel, inputs)
    floating = LayerInputs(twin, inputs, keep=[layer.name for layer in layers])  # float outputs: any order
    # In the order the quantized stepper runs them: `qmodel.layers` may list a residual block's shortcut conv
    # before the conv beside it, which the graph runs first.
    order = {node.name: i for i, node in enumerate(quantized.graph.nodes)}
    layers.sort(key=lambda layer: order.get(layer.name, len(order)))
    times = {}
    start = time.perf_counter()
    bar = progress_bar(len(layers), progress, "adaround", "layer")
    for layer in layers:
        t0 = time.perf_counter()
        bar.set_postfix_str(layer.name)
        x_q = quantized.inputs_of(layer.name)[0]
        y_f = floating.outputs_of(layer.name)[0]
        scale, qmin, qmax = grid_of(layer)
        kernel = layer.kernel.numpy()
        stats = {}
        codes = round_layer(layer.kind, kernel, layer.bias.numpy(), scale, qmin, qmax, x_q, y_f, layer.activation,
                            {"strides": layer.strides, "padding": layer.padding, "dilation_rate": layer.dilation_rate},
                            iterations, reg, batch_size=batch_size, stats=stats)
        layer.kernel.assign((codes * scale).astype(np.float32))
        times[layer.name] = time.perf_counter() - t0
        bar.update(1)
        if log:
            log(f"adaround {layer.name}: {kernel.size} weights, {stats['iterations']}/{iterations} iterations "
                f"({stats['rows']} rows each), {times[layer.name]:.1f} s")
    bar.close()
    times["total"] = time.perf_counter() - start
    return times
