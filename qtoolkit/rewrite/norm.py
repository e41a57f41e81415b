"""LayerNormalization as int8 ops: MEAN, SUB, PAD, L2_NORMALIZATION, then a per-channel affine.

    y = LN(x) = (x - mean(x)) / sqrt(var(x) + eps) * gamma + beta      (over the last axis, C channels)

TFLite has no int8 LayerNormalization, and the converter's lowering (the
fused batch norm's MEAN, SQUARED_DIFFERENCE, MEAN, ADD eps, RSQRT, MUL, MUL,
SUB, ADD, each requantized) loses most of its precision on two int8 tensors:
the variance, quantized per tensor over the range of every token's variance
(a token whose variance is a hundredth of the largest has 2-3 codes), and
its reciprocal root, whose range runs up to 1/sqrt(eps).  qtoolkit computes
the normalization in one op whose arithmetic is int32 inside:

    mu = MEAN(x)                         int8, calibrated range
    d  = SUB(x, mu)                      int8, calibrated range (shared with the padded tensor)
    p  = PAD(d, [0, e]),  e = sqrt(C eps)   the eps channel: ||p||^2 = C (var + eps)
    l  = L2_NORMALIZATION(p)             int8, fixed scale 1/128 (TFLite's): d / sqrt(C (var + eps))
    y  = SLICE(l)[..., :C] * gamma sqrt(C) + beta   a 1x1 depthwise conv, per-channel weights, calibrated

L2_NORMALIZATION sums the squares of the int8 codes in int32 and rescales
each by an inverse square root held in a 32-bit multiplier: one rounding, on
its output, where the converter's decomposition rounds five times.  Its
output grid is fixed (1/128 over [-1, 1)); an element's typical size is
1/sqrt(C), so its own noise floor falls with the width (about
10 log10(196608 / C) dB): up to `ops.LAYERNORM_L2_MAX_CHANNELS` (768,
measured: the two forms are even there) the L2 form is used, wider tensors
take the RSQRT form (`_rsqrt_form`: square, mean, + eps, RSQRT, multiply,
every intermediate calibrated).  docs/design.md has the measurements.

The input x, the mean and the centered values share one range (a tie):
TFLite's SUB of two tensors of one scale subtracts their codes exactly, so
the mean is the only rounding before the normalization; measured on the ViT
block, +2.6 dB over separate ranges.  gamma and beta stay a separate
per-channel affine: folding them into the projections that read the
normalization measured 0.8 dB worse on the ViT block (its weights-only
SQNR fell from 45.7 to 42.2 dB).
"""

from __future__ import annotations

import math

import tensorflow as tf
import tf_keras as keras

from qtoolkit.rewrite import ops
from qtoolkit.rewrite.context import BuildContext
from qtoolkit.rewrite.fold import layernorm_affine
from qtoolkit.rewrite.plan import Step

L = keras.layers

# The mean's range is its input's times this: no exact ties between two codes, which TensorFlow
# (half up) and TFLite's MEAN (half away from zero) round apart; the SUB stays exact (the
# mean's codes move by at most 128e-4 of a step).
MEAN_RANGE_FACTOR = 1.0 + 1e-4
# Tie the input's, the mean's and the centered values' ranges (False: each its own, for measurements).
TIE_CENTERED = True


def build_layernorm(ctx: BuildContext, step: Step):
    """The LayerNormalization of `step` as int8 ops (see the module docstring); the output's own
    quantizer is placed by the caller."""
    node, layer = step.node, step.node.layer
    x = ctx.input_of(step)
    name = node.name
    channels = int(x.shape[-1])
    # x, its mean and the centered values share one range (ties): the SUB then subtracts codes of
    # one scale, exactly, and the mean is rounded once, on x's grid (see the module docstring).
    source = ctx.point_of.get(node.inputs[0])
    mu = tf.reduce_mean(x, -1, keepdims=True, name=ctx.fresh_name(name, "_mean_op"))
    mu = _tied(ctx, ctx.quant_point(mu, name + "_mean", range_factor=MEAN_RANGE_FACTOR), source)
    d = tf.subtract(x, mu, name=ctx.fresh_name(name, "_sub"))
    if ops.layernorm_form(channels) == "rsqrt":
        scale, beta = layernorm_affine(layer)
        normalized = _rsqrt_form(ctx, d, name, float(layer.epsilon), source)
    else:
        scale, beta = layernorm_affine(layer, math.sqrt(channels))
        normalized = _l2_form(ctx, d, name, channels, float(layer.epsilon), source)
    return ctx.channel_affine(normalized, scale, beta, name)


def _tied(ctx: BuildContext, tensor, source):
    """`tensor` (just quantized) with its quantizer tied to `source`'s range (when there is one)."""
    if source is not None and TIE_CENTERED:
        ctx.ties.append((source, ctx.names[-1]))
    return tensor


def _l2_form(ctx: BuildContext, d, name: str, channels: int, epsilon: float, source):
    """d / sqrt(C (var + eps)) by L2_NORMALIZATION over d and one constant channel sqrt(C eps)."""
    rank = d.shape.rank
    e = math.sqrt(channels * epsilon)
    padded = tf.pad(d, [[0, 0]] * (rank - 1) + [[0, 1]], constant_values=e, name=ctx.fresh_name(name, "_eps"))
    # One range for d and the padded tensor (PAD keeps its input's scale): observed with the eps channel.
    padded = _tied(ctx, ctx.quant_point(padded, name + "_centered"), source)
    out = tf.math.l2_normalize(padded, -1, name=ctx.fresh_name(name, "_l2"))
    out = ctx.quant_point(out, name + "_l2", ops.L2_NORMALIZATION_RANGE)
    return tf.slice(out, [0] * rank, [-1] * (rank - 1) + [channels], name=ctx.fresh_name(name, "_drop_eps"))


def _rsqrt_form(ctx: BuildContext, d, name: str, epsilon: float, source):
    """d * rsqrt(mean(d * d) + eps), every intermediate an int8 tensor with its calibrated range."""
    d = _tied(ctx, ctx.quant_point(d, name + "_centered"), source)
    sq = ctx.quant_point(tf.multiply(d, d, name=ctx.fresh_name(name, "_square")), name + "_square")
    var = tf.reduce_mean(sq, -1, keepdims=True, name=ctx.fresh_name(name, "_var_op"))
    var = ctx.quant_point(var, name + "_var")
    var = ctx.quant_point(tf.add(var, epsilon, name=ctx.fresh_name(name, "_add_eps")), name + "_var_eps")
    r = ctx.quant_point(tf.math.rsqrt(var, name=ctx.fresh_name(name, "_rsqrt_op")), name + "_rsqrt")
    return ctx.quant_point(tf.multiply(d, r, name=ctx.fresh_name(name, "_normalize")), name + "_normalized")
