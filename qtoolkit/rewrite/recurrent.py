"""LSTM and GRU as int8 ops, unrolled over their (static) time steps.

tf_keras' LSTM/GRU run a while loop over a TensorList whose element shape
depends on the batch: the converter fails on it ('tf.TensorListReserve' op
requires element_shape to be static) unless the batch is fixed, and
`unroll=True` leaves the cell's ops without quantizers (float, DEQUANTIZEd).
qtoolkit lowers each layer into the cell's int8 ops, one copy per step,
every intermediate a fake quant the calibration sets (probes of the float
twin, like any other):

LSTM (gates i, f, g, o in tf_keras' kernel; their columns taken as f, i, g, o):
    zx  = FULLY_CONNECTED(x rows) + b           once over all N*T rows, one range
    z_t = zx_t + FULLY_CONNECTED(h_{t-1})        (step 0: zx_0 without f's columns, the state is zero)
    i, f, o = LOGISTIC(split(z_t)),  g = TANH(...)     fixed ranges (TFLite's)
    c_t = f * c_{t-1} + i * g                    MUL, MUL, ADD, each calibrated per step
    h_t = o * TANH(c_t)

GRU (reset_after=True, tf_keras' default; gates z, r, h):
    zx  = FULLY_CONNECTED(x rows) + b_in + [b_rec_z, b_rec_r, 0]
    zh  = FULLY_CONNECTED(h_{t-1}) + [0, 0, b_rec_h]     (step 0: the constant [0, 0, b_rec_h])
    z = LOGISTIC(zx_t[z] + zh[z]),  r = LOGISTIC(zx_t[r] + zh[r])     each ADD its own range
    n = TANH(zx_t[h] + r * zh[h]),  h_t = n + z * (h_{t-1} - n)        (step 0: n - z * n)

The arrangement keeps the cell in one XNNPACK partition: zx_t is a
STRIDED_SLICE without shrink_axis_mask and a RESHAPE to rows (XNNPACK takes no
shrinking slice), and every SPLIT is into equal parts (XNNPACK takes no
SPLIT_V).  Measured on the KWS Conv1D+GRU of scripts/bench_transformers.py:
17 partitions (16 slices and 31 SPLIT_V outside) -> 1, 37.2 -> 37.5 dB, 0.10 ->
0.04 ms; the LSTM 2 -> 1 partition at the same SQNR (33.3 dB), 0.09 -> 0.04 ms.

Every SPLIT output is used: step 0 slices away the forget gate, which the
zero cell state does not need (a SPLIT with an unused output was left float
by some conversions of one and the same model and not by others: the
converter's quantization of it is not deterministic).

The cell state is int8 with a range per step (TFLite's fused
UNIDIRECTIONAL_SEQUENCE_LSTM holds it in int16, but only the converter's
own calibration can produce that op: its int8 kernel needs statistics of
its internal gates that a fake-quant graph does not carry).  With
return_sequences the step outputs share one range (PACK copies codes).
The recurrent kernel is one layer called at every step: one weight range.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf
import tf_keras as keras

from qtoolkit.rewrite import ops
from qtoolkit.rewrite.context import BuildContext, load_folded
from qtoolkit.rewrite.plan import Step

L = keras.layers

SIGMOID = ops.FIXED_RANGE_8BIT["sigmoid"]
TANH = ops.FIXED_RANGE_8BIT["tanh"]


def _fc(ctx: BuildContext, kernel, bias, name):
    layer = ctx.folded_conv("dense", kernel.astype(np.float32), bias.astype(np.float32), "linear", name, {})
    return layer


def _call_fc(layer, x, kernel, bias, loaded):
    out = layer(x)
    if not loaded:
        load_folded(layer, kernel.astype(np.float32), bias.astype(np.float32))
    return out


class _Steps:
    """Quantizer placement per step, with the step index in each name."""

    def __init__(self, ctx: BuildContext, name: str):
        self.ctx, self.name = ctx, name

    def q(self, tensor, what, t, fixed=None):
        return self.ctx.quant_point(tensor, f"{self.name}_t{t}_{what}", fixed)

    def act(self, tensor, fn, what, t):
        ctx = self.ctx
        out = (tf.math.sigmoid if fn == "sigmoid" else tf.math.tanh)(tensor, name=ctx.fresh_name(self.name, f"_{what}{t}"))
        return self.q(out, what, t, SIGMOID if fn == "sigmoid" else TANH)


def build_recurrent(ctx: BuildContext, step: Step):
    """The LSTM or GRU of `step` unrolled into int8 ops (module docstring); the output's quantizer is
    placed by the caller (tied to the step outputs' shared range with return_sequences)."""
    node, layer = step.node, step.node.layer
    cell = layer.cell
    x = ctx.input_of(step)
    name = node.name
    steps = int(x.shape[1])
    units = int(cell.units)
    kernel, recurrent = cell.kernel.numpy(), cell.recurrent_kernel.numpy()
    is_gru = isinstance(layer, L.GRU)
    gates = 3 if is_gru else 4
    bias = cell.bias.numpy() if cell.use_bias else np.zeros((2, gates * units) if is_gru else gates * units, np.float32)
    if is_gru:
        b_in, b_rec = bias[0], bias[1]
        x_bias = b_in + np.concatenate([b_rec[:2 * units], np.zeros(units, np.float32)])
        h_bias = np.concatenate([np.zeros(2 * units, np.float32), b_rec[2 * units:]])
    else:
        # Gate columns as (f, i, g, o): step 0 (zero cell state) slices i, g, o alone (see _lstm_step).
        order = np.concatenate([np.arange(units, 2 * units), np.arange(units), np.arange(2 * units, 4 * units)])
        kernel, recurrent, bias = kernel[:, order], recurrent[:, order], bias[order]
        x_bias, h_bias = bias, np.zeros(gates * units, np.float32)
    fx = _fc(ctx, kernel, x_bias, name + "_input")
    zx = _call_fc(fx, x, kernel, x_bias, False)  # (N, T, gates*U): one FULLY_CONNECTED over the rows
    zx = ctx.quant_point(zx, name + "_input")
    fh = _fc(ctx, recurrent, h_bias, name + "_recurrent")
    s = _Steps(ctx, name)
    h = c = None
    outs, h_points = [], []
    loaded = False
    for t in range(steps):
        # LSTM step 0 needs no forget gate: its columns are left out (a SPLIT with an unused output
        # stayed float in some conversions: the converter's quantization of it is not deterministic).
        first = units if t == 0 and not is_gru else 0
        xt = tf.strided_slice(zx, [0, t, first], [0, t + 1, 0], begin_mask=1, end_mask=5,
                              name=ctx.fresh_name(name, f"_step{t}"))
        xt = tf.reshape(xt, [-1, int(xt.shape[-1])], name=ctx.fresh_name(name, f"_row{t}"))
        zh = None
        if h is not None:
            zh = s.q(_call_fc(fh, h, recurrent, h_bias, loaded), "recurrent", t)
            loaded = True
        if is_gru:
            h = _gru_step(ctx, s, t, xt, zh, h, h_bias[2 * units:], units)
        else:
            h, c = _lstm_step(ctx, s, t, xt, zh, c, units)
        last = t == steps - 1
        if layer.return_sequences or not last:
            h = s.q(h, "h", t)
            h_points.append(ctx.names[-1])
        outs.append(h)
    if not layer.return_sequences:
        return outs[-1]
    ctx.ties.extend((h_points[0], p) for p in h_points[1:])
    ctx.tie = h_points[0]
    return tf.stack(outs, axis=1, name=ctx.fresh_name(name, "_sequence"))


def _lstm_step(ctx, s, t, xt, zh, c, units):
    name = s.name
    if zh is None:  # step 0: xt holds (i, g, o) only
        f = None
        i, g, o = tf.split(xt, 3, axis=-1, name=ctx.fresh_name(name, f"_gates{t}"))
    else:
        z = s.q(tf.add(xt, zh, name=ctx.fresh_name(name, f"_z{t}")), "z", t)
        f, i, g, o = tf.split(z, 4, axis=-1, name=ctx.fresh_name(name, f"_gates{t}"))
    i, o, g = s.act(i, "sigmoid", "i", t), s.act(o, "sigmoid", "o", t), s.act(g, "tanh", "g", t)
    ig = tf.multiply(i, g, name=ctx.fresh_name(name, f"_ig{t}"))
    if c is None:
        c = s.q(ig, "c", t)
    else:
        f = s.act(f, "sigmoid", "f", t)
        fc = s.q(tf.multiply(f, c, name=ctx.fresh_name(name, f"_fc{t}")), "fc", t)
        ig = s.q(ig, "ig", t)
        c = s.q(tf.add(fc, ig, name=ctx.fresh_name(name, f"_c{t}")), "c", t)
    h = tf.multiply(o, s.act(c, "tanh", "tanh_c", t), name=ctx.fresh_name(name, f"_h{t}"))
    return h, c


def _gru_step(ctx, s, t, xt, zh, h, rec_bias_h, units):
    name = s.name
    xz, xr, xh = tf.split(xt, 3, axis=-1, name=ctx.fresh_name(name, f"_xsplit{t}"))
    if zh is None:  # zero state: the recurrent projection is its bias
        z, r = xz, xr
        hh = tf.constant(rec_bias_h.astype(np.float32))
    else:
        hz, hr, hh = tf.split(zh, 3, axis=-1, name=ctx.fresh_name(name, f"_hsplit{t}"))
        z = s.q(tf.add(xz, hz, name=ctx.fresh_name(name, f"_zin{t}")), "z_in", t)
        r = s.q(tf.add(xr, hr, name=ctx.fresh_name(name, f"_rin{t}")), "r_in", t)
    z, r = s.act(z, "sigmoid", "z", t), s.act(r, "sigmoid", "r", t)
    rh = s.q(tf.multiply(r, hh, name=ctx.fresh_name(name, f"_rh{t}")), "rh", t)
    n = s.act(s.q(tf.add(xh, rh, name=ctx.fresh_name(name, f"_nin{t}")), "n_in", t), "tanh", "n", t)
    if h is None:
        zn = s.q(tf.multiply(z, n, name=ctx.fresh_name(name, f"_zn{t}")), "zn", t)
        return tf.subtract(n, zn, name=ctx.fresh_name(name, f"_h{t}"))
    d = s.q(tf.subtract(h, n, name=ctx.fresh_name(name, f"_d{t}")), "d", t)
    zd = s.q(tf.multiply(z, d, name=ctx.fresh_name(name, f"_zd{t}")), "zd", t)
    return tf.add(n, zd, name=ctx.fresh_name(name, f"_h{t}"))
