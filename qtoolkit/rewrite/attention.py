"""MultiHeadAttention as int8 ops: FULLY_CONNECTED projections, BATCH_MATMUL, SOFTMAX.

    Q = FC(query rows; Wq / sqrt(D), bq / sqrt(D))   int8, calibrated      (N, H, T, D) after RESHAPE/TRANSPOSE
    K = FC(key rows; Wk, bk)                         int8, calibrated      (N, H, S, D)
    V = FC(value rows; Wv, bv)                       int8, calibrated      (N, H, S, D)
    scores = BATCH_MATMUL(Q, K, adj_y)               int8, calibrated      (N, H, T, S)
    P = SOFTMAX(scores)                              int8, fixed [0, 255/256] (TFLite's)
    context = BATCH_MATMUL(P, V)                     int8, calibrated      (N, H, T, D)
    out = FC(context rows (N*T, H*D); Wo, bo)        int8, the layer's own output quantizer

Each EinsumDense is one FULLY_CONNECTED over (N*T, C) rows with its bias fused and per-channel
int8 weights (the converter keeps the einsum's bias as a separate int8 ADD after a RESHAPE); the
1/sqrt(D) scaling of the query is folded into its weights and bias (the converter runs it as an
int8 MUL by a constant, one more rounding).  The layer is lowered when it is called without a
mask, attention over axis 1 of rank-3 inputs (tf_keras' default), not returning its scores;
rank-4 inputs with attention over axis 2 (attention_axes=(2,), MobileViT's patches) are RESHAPEd
to rank 3, axis 1 folded into the batch, and back; otherwise it stays as it is
(`ops.lowers_attention`).
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from qtoolkit.rewrite import graph as g
from qtoolkit.rewrite.context import BuildContext, load_folded
from qtoolkit.rewrite.layers import dense_rows
from qtoolkit.rewrite.ops import FIXED_RANGE_8BIT
from qtoolkit.rewrite.plan import Step


def _inputs(node: g.Node, tensors: dict):
    """(query, value, key) tensors of a MultiHeadAttention call, from the built tensors."""
    found = {}

    def capture(query, value, key=None, **_):
        found.update(query=query, value=value, key=value if key is None else key)

    g.call(node, tensors, layer=capture)
    return found["query"], found["value"], found["key"]


def _weights(dense, output=False):
    """(kernel, bias) of an EinsumDense as a 2-D FULLY_CONNECTED: (C, units) and (units,); the
    projections' kernels are (C, H, D), the output's (H, D, C)."""
    kernel = dense.kernel.numpy()
    units = kernel.shape[-1] if output else int(np.prod(kernel.shape[1:]))
    kernel = kernel.reshape(-1, units)
    bias = dense.bias.numpy().reshape(-1) if dense.bias is not None else np.zeros(units, np.float32)
    return kernel.astype(np.float32), bias.astype(np.float32)


def _project(ctx: BuildContext, x, kernel, bias, name: str):
    """x (N, T, C) @ kernel + bias as one FULLY_CONNECTED over the rows, then back to (N, T, units)."""
    rows, back = dense_rows(x)
    layer = ctx.folded_conv("dense", kernel, bias, "linear", name, {})
    out = layer(rows)
    load_folded(layer, kernel, bias)
    return back(out)


def _heads(ctx: BuildContext, x, heads: int, dim: int, name: str):
    """(N, T, H*D) -> (N, H, T, D): a RESHAPE and a TRANSPOSE (both keep the scale)."""
    x = tf.reshape(x, [-1, int(x.shape[1]), heads, dim], name=ctx.fresh_name(name, "_split"))
    return tf.transpose(x, [0, 2, 1, 3], name=ctx.fresh_name(name, "_heads"))


def build_attention(ctx: BuildContext, step: Step):
    """The MultiHeadAttention of `step` as int8 ops (see the module docstring); the output's own
    quantizer is placed by the caller."""
    node, layer = step.node, step.node.layer
    name = node.name
    query, value, key = _inputs(node, ctx.tensors)
    if query.shape.rank == 4:  # attention over axis 2: axis 1 folds into the batch (one RESHAPE each)
        fold = int(query.shape[1])
        query, value, key = (tf.reshape(t, [-1, *t.shape[2:]], name=ctx.fresh_name(name, "_fold"))
                             for t in (query, value, key))
        out = _attention(ctx, layer, name, query, value, key)
        return tf.reshape(out, [-1, fold, *out.shape[1:]], name=ctx.fresh_name(name, "_unfold"))
    return _attention(ctx, layer, name, query, value, key)


def _attention(ctx: BuildContext, layer, name: str, query, value, key):
    """Attention over axis 1 of rank-3 query, value and key (the module docstring)."""
    heads, key_dim = layer._num_heads, layer._key_dim
    value_dim = layer._value_dim or key_dim
    wq, bq = _weights(layer._query_dense)
    scale = 1.0 / np.sqrt(float(key_dim))
    q = ctx.quant_point(_project(ctx, query, wq * scale, bq * scale, name + "_query"), name + "_query")
    k = ctx.quant_point(_project(ctx, key, *_weights(layer._key_dense), name + "_key"), name + "_key")
    v = ctx.quant_point(_project(ctx, value, *_weights(layer._value_dense), name + "_value"), name + "_value")
    q, k, v = (_heads(ctx, t, heads, d, name + suffix)
               for t, d, suffix in ((q, key_dim, "_q"), (k, key_dim, "_k"), (v, value_dim, "_v")))
    scores = tf.matmul(q, k, transpose_b=True, name=ctx.fresh_name(name, "_scores_op"))
    scores = ctx.quant_point(scores, name + "_scores")
    probs = tf.nn.softmax(scores, -1, name=ctx.fresh_name(name, "_softmax_op"))
    probs = ctx.quant_point(probs, name + "_softmax", FIXED_RANGE_8BIT["softmax"])
    context = tf.matmul(probs, v, name=ctx.fresh_name(name, "_context_op"))
    context = ctx.quant_point(context, name + "_context")
    context = tf.transpose(context, [0, 2, 1, 3], name=ctx.fresh_name(name, "_merge"))
    context = tf.reshape(context, [-1, int(context.shape[1]), heads * value_dim],
                         name=ctx.fresh_name(name, "_concat_heads"))
    wo, bo = _weights(layer._output_dense, output=True)
    return _project(ctx, context, wo, bo, name)
