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
1/sqrt(C), so its own noise floor is about 10 log10(196608 / C) dB (38 dB at
C = 32, 29 dB at C = 256): `LOWERING_L2_MAX_CHANNELS` says up to which width
the L2 form is used; wider tensors take the RSQRT form (`_rsqrt_form`), with
every intermediate calibrated.  docs/design.md has the measurements.
"""

from __future__ import annotations

import math

import numpy as np
import tensorflow as tf
import tf_keras as keras

from qtoolkit.rewrite import graph as g
from qtoolkit.rewrite.context import BuildContext
from qtoolkit.rewrite.plan import Step

L = keras.layers

# L2_NORMALIZATION's fixed int8 output: scale 1/128, zero point 0 (TFLite requires it).
L2_RANGE = (-1.0, 127 / 128)
# The widest normalized axis the L2_NORMALIZATION form takes (its output grid's noise floor is
# 10 log10(196608 / C) dB); wider ones are computed with RSQRT (see the module docstring).
LOWERING_L2_MAX_CHANNELS = 256
# Set to "l2" or "rsqrt" to force one form (measurements); None chooses by width.
FORCE_FORM = None
# The mean's range is its input's times this: no exact ties between two codes, which TensorFlow
# (half up) and TFLite's MEAN (half away from zero) round apart; the SUB stays exact (the
# mean's codes move by at most 128e-4 of a step).
MEAN_RANGE_FACTOR = 1.0 + 1e-4
# Tie the input's, the mean's and the centered values' ranges (False: each its own, for measurements).
TIE_CENTERED = True


def gamma_beta(layer) -> tuple[np.ndarray, np.ndarray]:
    """(gamma, beta) of a LayerNormalization (ones/zeros when it does not scale/center)."""
    channels = int(layer.input_shape[-1])
    gamma = layer.gamma.numpy() if layer.scale else np.ones(channels, np.float32)
    beta = layer.beta.numpy() if layer.center else np.zeros(channels, np.float32)
    return gamma.astype(np.float32), beta.astype(np.float32)


def form_of(channels: int) -> str:
    """"l2" or "rsqrt": how a normalization over `channels` is lowered."""
    if FORCE_FORM is not None:
        return FORCE_FORM
    return "l2" if channels <= LOWERING_L2_MAX_CHANNELS else "rsqrt"


def build_layernorm(ctx: BuildContext, step: Step):
    """The LayerNormalization of `step` as int8 ops (see the module docstring); the output's own
    quantizer is placed by the caller."""
    node, layer = step.node, step.node.layer
    if ctx.qat:
        # QAT trains the layer as it is (gamma and beta in a FoldedConv would keep a stale weight range).
        return g.call(node, ctx.tensors)
    x = ctx.input_of(step)
    name = node.name
    channels = int(x.shape[-1])
    gamma, beta = gamma_beta(layer)
    # x, its mean and the centered values share one range (ties): the SUB then subtracts codes of
    # one scale, exactly, and the mean is rounded once, on x's grid (see the module docstring).
    source = ctx.point_of.get(node.inputs[0])
    mu = tf.reduce_mean(x, -1, keepdims=True, name=ctx.fresh_name(name, "_mean_op"))
    mu = _tied(ctx, ctx.quant_point(mu, name + "_mean", range_factor=MEAN_RANGE_FACTOR), source)
    d = tf.subtract(x, mu, name=ctx.fresh_name(name, "_sub"))
    if form_of(channels) == "rsqrt":
        normalized, scale = _rsqrt_form(ctx, d, name, float(layer.epsilon), source), gamma
    else:
        normalized = _l2_form(ctx, d, name, channels, float(layer.epsilon), source)
        scale = gamma * math.sqrt(channels)
    return ctx.channel_affine(normalized, scale.astype(np.float32), beta, name)


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
    out = ctx.quant_point(out, name + "_l2", L2_RANGE)
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
