"""Quantizer numerics: ranges, scales and zero-points, (fake-)quantization.

A numpy reference that reproduces TensorFlow's `FakeQuantWithMinMaxVars`
arithmetic bit for bit (it is what the TFLite converter reads), and the same
operations as TensorFlow ops with a straight-through-estimator gradient.

    >>> import numpy as np
    >>> from qtoolkit import quantizers as q
    >>> p = q.qparams(-1.0, 3.0, bits=8)            # asymmetric, signed int8
    >>> int(p.zero_point), float(p.scale)
    (-64, 0.01568627543747425)
    >>> q.fake_quant(np.array([0.0, 1.0, 9.0], np.float32), -1.0, 3.0)
    array([0.       , 1.0039216, 2.9960785], dtype=float32)

Conventions (those of TensorFlow and the TFLite quantization spec):
  * The grid of `bits` bits is [0, 2^bits - 1] for TensorFlow's ops and
    [-2^(bits-1), 2^(bits-1) - 1] when `signed` (TFLite int8); narrow range
    drops the lowest code ([-127, 127] for int8 weights).
  * The real range is *nudged* so that 0.0 falls exactly on an integer code:
    scale = (max - min) / (qmax - qmin); zero_point = round(qmin - min/scale)
    clamped to the grid; the range becomes [(qmin-zp)*scale, (qmax-zp)*scale].
  * Symmetric ranges are [-a, a] with a = max(|min|, |max|); with narrow range
    the zero-point is then exactly the middle of the grid (0 when signed).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

MIN_BITS = 2
MAX_BITS = 16
# Smallest width a range is widened to, so that a constant tensor (min == max,
# all zeros) still gets a finite scale instead of a division by zero.
_MIN_RANGE = np.float32(1e-8)


@dataclasses.dataclass(frozen=True)
class QParams:
    """Scale and zero-point of a quantized tensor (arrays for per-channel).

    Attributes:
      scale: float32 step between two integer codes.
      zero_point: integer code of the real value 0.0 (on the chosen grid).
      qmin: lowest integer code of the grid.
      qmax: highest integer code of the grid.
      nudged_min: real value of `qmin` (float32).
      nudged_max: real value of `qmax` (float32).
    """

    scale: np.ndarray
    zero_point: np.ndarray
    qmin: int
    qmax: int
    nudged_min: np.ndarray
    nudged_max: np.ndarray


def grid(bits: int, narrow_range: bool = False, signed: bool = True) -> tuple[int, int]:
    """The integer codes [qmin, qmax] of a `bits`-bit grid.

    Args:
      bits: number of bits, 2 to 16.
      narrow_range: drop the lowest code (int8: [-127, 127]).
      signed: two's-complement grid; otherwise unsigned [0, 2^bits - 1].

    Returns:
      (qmin, qmax).

    Raises:
      ValueError: if `bits` is outside [2, 16].
    """
    check_bits(bits)
    qmin, qmax = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
    return qmin + int(narrow_range), qmax


def check_bits(bits: int) -> None:
    """Raises ValueError unless `bits` is an integer in [MIN_BITS, MAX_BITS]."""
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"bits must be an integer from {MIN_BITS} to {MAX_BITS}, got {bits!r}")


def sanitize_range(min_val, max_val, symmetric: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Makes a range quantizable: finite, containing 0, and of non-zero width.

    The paper (section 2.1) relaxes every range to include 0 so that zero
    padding is exact; a constant tensor gets a tiny range instead of scale 0.

    Args:
      min_val: observed minimum (scalar or per-channel array).
      max_val: observed maximum, same shape.
      symmetric: return [-a, a] with a = max(|min|, |max|).

    Returns:
      (min, max) as float32 arrays.

    Raises:
      ValueError: if a bound is NaN or infinite, or min > max.
    """
    lo = np.asarray(min_val, np.float32)
    hi = np.asarray(max_val, np.float32)
    if not (np.all(np.isfinite(lo)) and np.all(np.isfinite(hi))):
        raise ValueError(f"range bounds must be finite, got min={lo}, max={hi}")
    if np.any(lo > hi):
        raise ValueError(f"range min must not exceed max, got min={lo}, max={hi}")
    lo = np.minimum(lo, np.float32(0))
    hi = np.maximum(hi, np.float32(0))
    if symmetric:
        hi = np.maximum(-lo, hi)
        hi = np.maximum(hi, _MIN_RANGE / 2)
        lo = -hi
    else:
        hi = np.where(hi - lo < _MIN_RANGE, lo + _MIN_RANGE, hi).astype(np.float32)
    return lo, hi


def nudge(min_val, max_val, quant_min: int, quant_max: int):
    """TensorFlow's `Nudge` (fake_quant_ops_functor.h), in float32.

    Args:
      min_val: range minimum (array); max_val: range maximum, max > min.
      quant_min: lowest unsigned code; quant_max: highest unsigned code.

    Returns:
      (nudged_min, nudged_max, scale, inv_scale, zero_point) with the zero
      point on the unsigned grid [quant_min, quant_max].
    """
    lo = np.asarray(min_val, np.float32)
    hi = np.asarray(max_val, np.float32)
    qmin_f, qmax_f = np.float32(quant_min), np.float32(quant_max)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        scale = ((hi - lo) / (qmax_f - qmin_f)).astype(np.float32)
        inv_scale = ((qmax_f - qmin_f) / (hi - lo)).astype(np.float32)
        zp_from_min = (qmin_f - lo / scale).astype(np.float32)
    # std::round: halves away from zero (np.round would round half to even).
    rounded = np.sign(zp_from_min) * np.floor(np.abs(zp_from_min) + np.float32(0.5))
    zp = np.where(zp_from_min < qmin_f, qmin_f, np.where(zp_from_min > qmax_f, qmax_f, rounded))
    zp = np.nan_to_num(zp, nan=qmin_f).astype(np.float32)
    nudged_min = ((qmin_f - zp) * scale).astype(np.float32)
    nudged_max = ((qmax_f - zp) * scale).astype(np.float32)
    return nudged_min, nudged_max, scale, inv_scale, zp.astype(np.int64)


def qparams(min_val, max_val, bits: int = 8, *, symmetric: bool = False,
            narrow_range: bool = False, signed: bool = True) -> QParams:
    """Scale and zero-point for a range, with TFLite's nudging.

    Args:
      min_val: range minimum, scalar or per-channel array.
      max_val: range maximum, same shape.
      bits: 2 to 16.
      symmetric: use [-a, a], a = max(|min|, |max|).
      narrow_range: drop the lowest code.
      signed: two's-complement grid (TFLite int8/int16) or unsigned.

    Returns:
      QParams for the range after `sanitize_range`.
    """
    qmin, qmax = grid(bits, narrow_range, signed)
    lo, hi = sanitize_range(min_val, max_val, symmetric)
    umin = int(narrow_range)
    nmin, nmax, scale, _, zp = nudge(lo, hi, umin, (1 << bits) - 1)
    return QParams(scale=scale, zero_point=zp + (qmin - umin), qmin=qmin, qmax=qmax,
                   nudged_min=nmin, nudged_max=nmax)


def _per_channel(x: np.ndarray, values, axis: Optional[int]) -> np.ndarray:
    """Reshapes per-channel `values` so they broadcast along `axis` of `x`."""
    values = np.asarray(values)
    if axis is None or values.ndim == 0:
        return values
    shape = [1] * x.ndim
    shape[axis] = -1
    return values.reshape(shape)


def quantize(x, p: QParams, axis: Optional[int] = None, rounding: str = "nearest",
             rng: Optional[np.random.Generator] = None) -> np.ndarray:
    """Real values to integer codes: clamp to the nudged range, then round.

    Args:
      x: float array.
      p: QParams (per-channel arrays broadcast along `axis`).
      axis: channel axis for per-channel params, None for per-tensor.
      rounding: "nearest" (halves up, as TensorFlow) or "stochastic"
        (round up with probability equal to the fractional part).
      rng: numpy Generator for stochastic rounding (seeded by the caller).

    Returns:
      int64 array of codes in [p.qmin, p.qmax].
    """
    x = np.asarray(x, np.float32)
    nmin, nmax = _per_channel(x, p.nudged_min, axis), _per_channel(x, p.nudged_max, axis)
    inv = (np.float32(1) / _per_channel(x, p.scale, axis)).astype(np.float32)
    shifted = ((np.minimum(np.maximum(x, nmin), nmax) - nmin) * inv).astype(np.float32)
    if rounding == "nearest":
        codes = np.floor(shifted + np.float32(0.5))
    elif rounding == "stochastic":
        rng = rng or np.random.default_rng(0)
        codes = np.floor(shifted + rng.random(shifted.shape, dtype=np.float32))
    else:
        raise ValueError(f"rounding must be 'nearest' or 'stochastic', got {rounding!r}")
    return np.clip(codes.astype(np.int64) + p.qmin, p.qmin, p.qmax)


def dequantize(codes, p: QParams, axis: Optional[int] = None) -> np.ndarray:
    """Integer codes to real values, (code - zero_point) * scale, in float32."""
    codes = np.asarray(codes)
    zp = _per_channel(codes, p.zero_point, axis)
    return ((codes - zp).astype(np.float32) * _per_channel(codes, p.scale, axis)).astype(np.float32)


def fake_quant(x, min_val, max_val, bits: int = 8, narrow_range: bool = False,
               axis: Optional[int] = None) -> np.ndarray:
    """Numpy twin of `tf.quantization.fake_quant_with_min_max_vars[_per_channel]`.

    Bit-identical to TensorFlow for the same (min, max): the output is
    floor((clamp(x) - nudged_min) / scale - z + 0.5) * scale in float32, with
    z = floor(-nudged_min / scale + 0.5) the zero code (fake_quant_ops_functor.h).
    Unlike `qparams`, the range is used as given (TensorFlow does not widen it
    to include 0; its nudging shifts it instead).

    Args:
      x: float array.
      min_val, max_val: range, scalars or per-channel arrays along `axis`.
      bits: 2 to 16; narrow_range: drop the lowest code.
      axis: channel axis (TensorFlow's per-channel op uses the last axis).

    Returns:
      float32 array of the same shape as `x`.
    """
    check_bits(bits)
    x = np.asarray(x, np.float32)
    lo, hi = np.asarray(min_val, np.float32), np.asarray(max_val, np.float32)
    nmin, nmax, scale, inv, _ = nudge(lo, hi, int(narrow_range), (1 << bits) - 1)
    nmin, nmax = _per_channel(x, nmin, axis), _per_channel(x, nmax, axis)
    scale, inv = _per_channel(x, scale, axis), _per_channel(x, inv, axis)
    clamped = np.minimum(np.maximum(x, nmin), nmax)
    shifted = (clamped - nmin).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        # TensorFlow's per-tensor kernel divides by the scale, its per-channel
        # kernel multiplies by the inverse; both subtract the zero code so that
        # 0.0 comes out exactly as 0.0.
        steps = (shifted / scale if axis is None else shifted * inv).astype(np.float32)
        quant_zero = np.floor((-nmin * inv).astype(np.float32) + np.float32(0.5)).astype(np.float32)
        out = (np.floor(steps - quant_zero + np.float32(0.5)) * scale).astype(np.float32)
    # TensorFlow returns zeros for the range [0, 0] (scale 0 would give NaN).
    zero = _per_channel(x, (lo == 0) & (hi == 0), axis)
    return np.where(zero, np.float32(0), out).astype(np.float32)


# --------------------------------------------------------------------------
# TensorFlow ops (imported lazily so the numpy reference stays light).


def tf_fake_quant(x, min_val, max_val, bits: int = 8, narrow_range: bool = False,
                  axis: Optional[int] = None, rounding: str = "nearest", seed: Optional[int] = None):
    """Fake-quantizes a tensor with TensorFlow's own ops (what TFLite reads).

    The gradient is the straight-through estimator: 1 for inputs inside the
    nudged range, 0 outside (and TensorFlow's gradients for min and max).

    Args:
      x: float32 tensor.
      min_val, max_val: scalar tensors, or 1-D per-channel tensors along `axis`.
      bits: 2 to 16; narrow_range: drop the lowest code.
      axis: channel axis for per-channel ranges (any axis; TensorFlow's op
        wants the last, so the tensor is transposed around it).
      rounding: "nearest", or "stochastic" for experiments (not exportable).
      seed: seed of the stochastic rounding noise.

    Returns:
      A float32 tensor of the shape of `x`.
    """
    import tensorflow as tf

    check_bits(bits)
    if rounding == "stochastic":
        return _tf_stochastic_fake_quant(x, min_val, max_val, bits, narrow_range, axis, seed)
    if rounding != "nearest":
        raise ValueError(f"rounding must be 'nearest' or 'stochastic', got {rounding!r}")
    if axis is None:
        return tf.quantization.fake_quant_with_min_max_vars(
            x, min_val, max_val, num_bits=bits, narrow_range=narrow_range)
    rank = x.shape.rank
    axis = axis % rank
    if axis == rank - 1:
        return tf.quantization.fake_quant_with_min_max_vars_per_channel(
            x, min_val, max_val, num_bits=bits, narrow_range=narrow_range)
    perm = [d for d in range(rank) if d != axis] + [axis]
    inverse = np.argsort(perm).tolist()
    y = tf.quantization.fake_quant_with_min_max_vars_per_channel(
        tf.transpose(x, perm), min_val, max_val, num_bits=bits, narrow_range=narrow_range)
    return tf.transpose(y, inverse)


def tf_learned_fake_quant(x, min_val, max_val, bits: int = 8, narrow_range: bool = False,
                          per_channel: bool = False):
    """`tf_fake_quant` (the same forward values, TensorFlow's op) with learned-step-size gradients for the range.

    The gradient for `x` is the straight-through estimator (1 inside the range, 0 outside). The range gets
    LSQ's (Esser et al. 2020, with LSQ+'s offset): with step s = (max - min) / N over N steps and
    v = (x - min) / s (min nudged as the op nudges it), the output x_q = min + s * clip(round(v), 0, N) has dx_q/ds = round(v) - v inside,
    N above and 0 below, and dx_q/dmin = 1 outside (s fixed) and 0 inside; both scaled by LSQ's
    1 / sqrt(values per range * N). TensorFlow's own gradient gives the range only the clipped values'
    share, which pushes a range outwards and never weighs the rounding error inside it.

    Args:
      x: float32 tensor; min_val, max_val: scalars, or per channel along the last axis when `per_channel`.
      bits, narrow_range: as `tf_fake_quant`.
    """
    import tensorflow as tf

    steps = float((1 << bits) - 1 - int(narrow_range))

    @tf.custom_gradient
    def _fq(t, lo, hi):
        out = tf_fake_quant(t, lo, hi, bits, narrow_range, axis=-1 if per_channel else None)

        def grad(dy):
            axes = list(range(t.shape.rank - 1)) if per_channel else None
            step = (hi - lo) / steps
            # In the op's nudged frame (zero point rounded to an integer code), so that round(v) - v is the
            # rounding error the forward made; the nudge itself passes gradients straight through.
            qmin = float(int(narrow_range))
            zero_point = tf.clip_by_value(tf.floor(qmin - lo / step + 0.5), qmin, qmin + steps)
            v = (t - (qmin - zero_point) * step) / step
            below, above = v < 0.0, v > steps
            outside = tf.cast(below | above, dy.dtype)
            d_v = tf.where(above, steps, tf.where(below, 0.0, tf.round(v) - v))
            count = tf.cast(tf.size(t), tf.float32) / tf.cast(tf.size(lo), tf.float32)
            g = tf.math.rsqrt(count * steps)
            d_step = tf.reduce_sum(dy * d_v, axis=axes) * g
            d_lo = tf.reduce_sum(dy * outside, axis=axes) * g
            return dy * (1.0 - outside), d_lo - d_step / steps, d_step / steps

        return out, grad

    # Tensors in (a variable read inside would make the gradient function owe the variable its own gradient).
    return _fq(tf.convert_to_tensor(x, tf.float32), tf.convert_to_tensor(min_val, tf.float32),
               tf.convert_to_tensor(max_val, tf.float32))


def _tf_stochastic_fake_quant(x, min_val, max_val, bits, narrow_range, axis, seed):
    """Stochastic-rounding fake quant with a straight-through gradient."""
    import tensorflow as tf

    @tf.custom_gradient
    def _fq(t, lo, hi):
        rank = t.shape.rank
        shape = [1] * rank
        if axis is not None:
            shape[axis % rank] = -1
        qmin_f = tf.constant(float(int(narrow_range)), tf.float32)
        qmax_f = tf.constant(float((1 << bits) - 1), tf.float32)
        lo_, hi_ = tf.reshape(lo, shape), tf.reshape(hi, shape)
        scale = (hi_ - lo_) / (qmax_f - qmin_f)
        zp = tf.clip_by_value(tf.round(qmin_f - lo_ / scale), qmin_f, qmax_f)
        nmin, nmax = (qmin_f - zp) * scale, (qmax_f - zp) * scale
        clamped = tf.clip_by_value(t, nmin, nmax)
        noise = tf.random.stateless_uniform(tf.shape(t), seed=[seed or 0, 0])
        out = tf.floor((clamped - nmin) / scale + noise) * scale + nmin

        def grad(dy):
            inside = tf.cast((t >= nmin) & (t <= nmax), dy.dtype)
            return dy * inside, tf.zeros_like(lo), tf.zeros_like(hi)

        return out, grad

    return _fq(x, tf.convert_to_tensor(min_val, tf.float32), tf.convert_to_tensor(max_val, tf.float32))


def depthwise_to_channels(kernel):
    """Depthwise kernel (kh, kw, in, mult) -> (kh, kw, in*mult), channel last.

    TFLite's depthwise output channel c = i*mult + m, so per-channel ranges of a
    depthwise kernel are over that combined axis (not over `mult` alone).
    """
    shape = kernel.shape
    return np.reshape(kernel, (shape[0], shape[1], shape[2] * shape[3])) if isinstance(kernel, np.ndarray) \
        else _tf_reshape(kernel, (shape[0], shape[1], shape[2] * shape[3]))


def _tf_reshape(t, shape):
    import tensorflow as tf

    return tf.reshape(t, shape)


def channel_range(w: np.ndarray, axis: Optional[int]) -> tuple[np.ndarray, np.ndarray]:
    """Min and max of `w` over every axis but `axis` (all axes when None)."""
    if axis is None:
        return np.float32(np.min(w)), np.float32(np.max(w))
    reduce = tuple(d for d in range(w.ndim) if d != axis % w.ndim)
    return np.min(w, axis=reduce).astype(np.float32), np.max(w, axis=reduce).astype(np.float32)
