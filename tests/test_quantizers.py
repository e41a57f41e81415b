"""Quantizer numerics: bit-exact against TensorFlow, hand-computed cases, properties."""

import numpy as np
import pytest
import tensorflow as tf
from hypothesis import given, settings
from hypothesis import strategies as st

from qtoolkit import quantizers as q

BITS = list(range(2, 17))


def _tf(x, lo, hi, bits, narrow, axis=None):
    return q.tf_fake_quant(tf.constant(x), tf.constant(lo), tf.constant(hi), bits, narrow, axis).numpy()


# ---------------------------------------------------------------- bit-exactness

@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("narrow", [False, True])
def test_per_tensor_matches_tensorflow_exactly(bits, narrow):
    rng = np.random.default_rng(bits)
    x = rng.normal(0, 3, 4096).astype(np.float32)
    # Values exactly on and half-way between codes, and outside the range.
    ranges = [(-1.0, 1.0), (-6.0, 0.5), (0.0, 6.0), (-0.3, 5.1), (0.2, 0.9), (-2.0, -0.5), (-1e-3, 1e-3)]
    for lo, hi in ranges:
        p = q.nudge(np.float32(lo), np.float32(hi), int(narrow), (1 << bits) - 1)
        scale, nmin = p[2], p[0]
        ticks = (nmin + scale * np.arange(-3, (1 << bits) + 3, 0.5, dtype=np.float32)).astype(np.float32)
        xs = np.concatenate([x, ticks[:20000]])
        ref = _tf(xs, np.float32(lo), np.float32(hi), bits, narrow)
        got = q.fake_quant(xs, lo, hi, bits, narrow)
        assert np.max(np.abs(got - ref)) == 0.0, (bits, narrow, lo, hi)


@pytest.mark.parametrize("bits", [2, 4, 8, 12, 16])
@pytest.mark.parametrize("narrow", [False, True])
@pytest.mark.parametrize("axis", [0, 1, 2, 3, -1])
def test_per_channel_any_axis_matches_tensorflow_exactly(bits, narrow, axis):
    rng = np.random.default_rng(100 + bits)
    x = rng.normal(0, 1, (3, 4, 5, 6)).astype(np.float32)
    n = x.shape[axis]
    lo = -rng.uniform(0.1, 2, n).astype(np.float32)
    hi = rng.uniform(0.1, 2, n).astype(np.float32)
    ref = _tf(x, lo, hi, bits, narrow, axis)
    got = q.fake_quant(x, lo, hi, bits, narrow, axis=axis)
    assert np.max(np.abs(got - ref)) == 0.0
    # Per-channel equals per-tensor applied channel by channel.
    for c in range(n):
        sl = np.take(x, c, axis=axis)
        np.testing.assert_array_equal(np.take(got, c, axis=axis), q.fake_quant(sl, lo[c], hi[c], bits, narrow))


def test_depthwise_channels_include_multiplier():
    rng = np.random.default_rng(0)
    kernel = rng.normal(size=(3, 3, 4, 2)).astype(np.float32)  # in=4, mult=2
    flat = q.depthwise_to_channels(kernel)
    assert flat.shape == (3, 3, 8)
    # TFLite's output channel c = i * mult + m.
    np.testing.assert_array_equal(flat[..., 2 * 1 + 1], kernel[..., 1, 1])
    lo, hi = q.channel_range(flat, -1)
    assert lo.shape == (8,) and hi[3] == kernel[..., 1, 1].max()


# ------------------------------------------------------- hand-computed table

# (min, max, bits, narrow, symmetric, expected scale, expected zero point on the signed grid)
QPARAM_CASES = [
    # [-1, 3] over 255 steps: scale 4/255, zero at code -128 + 1/scale*1 = -64.25 -> -64.
    (-1.0, 3.0, 8, False, False, 4 / 255, -64),
    # ReLU6 output: [0, 6] asymmetric int8, zero at the lowest code.
    (0.0, 6.0, 8, False, False, 6 / 255, -128),
    # Symmetric narrow-range int8 weights: [-2, 2] over 254 steps, zero point 0.
    (-0.5, 2.0, 8, True, True, 4 / 254, 0),
    # An all-negative range is widened to include 0: [-4, 0], zero at the top code.
    (-4.0, -1.0, 8, False, False, 4 / 255, 127),
    # 4-bit asymmetric [-1, 2]: 15 steps of 0.2, zero at -8 + 5 = -3.
    (-1.0, 2.0, 4, False, False, 0.2, -3),
    # 16-bit symmetric (int16x8 activations): [-1, 1] over 65534 steps, zero 0.
    (-1.0, 1.0, 16, True, True, 2 / 65534, 0),
    # Constant zero tensor: widened to a tiny range, scale stays finite, zero exact.
    (0.0, 0.0, 8, False, False, 1e-8 / 255, -128),
]


@pytest.mark.parametrize("lo,hi,bits,narrow,sym,scale,zp", QPARAM_CASES)
def test_qparams_table(lo, hi, bits, narrow, sym, scale, zp):
    p = q.qparams(lo, hi, bits, symmetric=sym, narrow_range=narrow)
    assert int(p.zero_point) == zp
    assert float(p.scale) == pytest.approx(scale, rel=1e-6)
    # Zero is always exactly representable.
    assert q.dequantize(q.quantize(np.float32(0), p), p) == 0.0


# (x, min, max, bits, narrow, expected fake-quant output)
FAKE_QUANT_CASES = [
    # 1.0 in [-1, 3]: zero code 64, nudged range [-1.0039, 2.9961]; 1.0 is 63.75 steps above 0 -> 64 steps.
    (1.0, -1.0, 3.0, 8, False, 64 * 4 / 255),
    # Values above max clamp to the nudged max, 191 steps above zero.
    (9.0, -1.0, 3.0, 8, False, 191 * 4 / 255),
    # Exactly half-way between codes 0 and 1 of [0, 1] 2-bit (step 1/3): TF rounds half up.
    (1 / 6, 0.0, 1.0, 2, False, np.float32(1 / 3)),
    # Below a [0, 6] range clamps to 0 exactly.
    (-3.0, 0.0, 6.0, 8, False, 0.0),
    # Range [0, 0]: TensorFlow outputs zeros.
    (5.0, 0.0, 0.0, 8, False, 0.0),
    # Narrow range symmetric [-1, 1], 8 bit: -1 maps to code -127 exactly.
    (-1.0, -1.0, 1.0, 8, True, -1.0),
]


@pytest.mark.parametrize("x,lo,hi,bits,narrow,expected", FAKE_QUANT_CASES)
def test_fake_quant_table(x, lo, hi, bits, narrow, expected):
    got = q.fake_quant(np.array([x], np.float32), lo, hi, bits, narrow)[0]
    assert got == pytest.approx(float(expected), abs=1e-6)
    assert got == _tf(np.array([x], np.float32), np.float32(lo), np.float32(hi), bits, narrow)[0]


def test_grids():
    assert q.grid(8) == (-128, 127)
    assert q.grid(8, narrow_range=True) == (-127, 127)
    assert q.grid(8, signed=False) == (0, 255)
    assert q.grid(16) == (-32768, 32767)
    assert q.grid(2) == (-2, 1)
    for bad in (1, 17, 0, 8.0, True):
        with pytest.raises(ValueError, match="bits must be"):
            q.grid(bad)


def test_unsigned_grid_zero_point():
    p = q.qparams(0.0, 6.0, 8, signed=False)
    assert int(p.zero_point) == 0 and p.qmax == 255
    p = q.qparams(-1.0, 3.0, 8, signed=False)
    assert int(p.zero_point) == 64


# ----------------------------------------------------------- degenerate input

@pytest.mark.parametrize("lo,hi", [(0.0, 0.0), (2.5, 2.5), (-3.0, -3.0), (0.0, 1e-30)])
def test_degenerate_ranges_have_no_nan(lo, hi):
    for sym in (False, True):
        p = q.qparams(lo, hi, 8, symmetric=sym, narrow_range=sym)
        assert np.isfinite(p.scale) and p.scale > 0
        x = np.array([lo, hi, 0.0], np.float32)
        y = q.dequantize(q.quantize(x, p), p)
        assert np.all(np.isfinite(y))
        assert y[2] == 0.0
        lo_s, hi_s = q.sanitize_range(lo, hi, symmetric=sym)
        assert np.all(np.isfinite(q.fake_quant(x, lo_s, hi_s, 8, sym)))
        assert np.all(np.isfinite(_tf(x, lo_s, hi_s, 8, sym)))


def test_invalid_ranges_raise():
    with pytest.raises(ValueError, match="finite"):
        q.qparams(np.nan, 1.0)
    with pytest.raises(ValueError, match="finite"):
        q.qparams(0.0, np.inf)
    with pytest.raises(ValueError, match="must not exceed"):
        q.qparams(2.0, 1.0)


# ------------------------------------------------------------------ properties

finite = st.floats(-1e3, 1e3, allow_nan=False, width=32)


@settings(max_examples=200, deadline=None)
@given(st.lists(finite, min_size=1, max_size=64), finite, finite, st.integers(2, 16), st.booleans())
def test_error_at_most_half_a_step_inside_range(xs, a, b, bits, sym):
    lo, hi = min(a, b), max(a, b)
    p = q.qparams(lo, hi, bits, symmetric=sym, narrow_range=sym)
    x = np.clip(np.array(xs, np.float32), p.nudged_min, p.nudged_max)
    err = np.abs(q.dequantize(q.quantize(x, p), p) - x)
    # Half a step plus float32 rounding of the affine arithmetic.
    tol = float(p.scale) / 2 + 4 * np.finfo(np.float32).eps * float(max(abs(p.nudged_min), abs(p.nudged_max), 1e-30))
    assert np.all(err <= tol)


@settings(max_examples=200, deadline=None)
@given(st.lists(finite, min_size=2, max_size=64), finite, finite, st.integers(2, 16), st.booleans())
def test_idempotent_and_monotonic(xs, a, b, bits, narrow):
    # TensorFlow itself returns NaN for min == max != 0; qtoolkit never hands it
    # such a range, it widens it first (sanitize_range).
    lo, hi = q.sanitize_range(min(a, b), max(a, b))
    x = np.sort(np.array(xs, np.float32))
    y = q.fake_quant(x, lo, hi, bits, narrow)
    np.testing.assert_array_equal(q.fake_quant(y, lo, hi, bits, narrow), y)
    assert np.all(np.diff(y) >= 0)
    codes = q.quantize(x, q.qparams(lo, hi, bits, narrow_range=narrow))
    assert np.all(np.diff(codes) >= 0)


# ------------------------------------------------------------ TF op gradients

def test_straight_through_gradient():
    x = tf.constant([-2.0, -0.5, 0.0, 0.7, 1.5], tf.float32)
    for rounding in ("nearest", "stochastic"):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = q.tf_fake_quant(x, -1.0, 1.0, 8, rounding=rounding, seed=1)
        g = tape.gradient(y, x).numpy()
        np.testing.assert_array_equal(g, [0, 1, 1, 1, 0])


def test_stochastic_rounding_is_unbiased_and_on_grid():
    x = np.full(20000, 0.3, np.float32)
    p = q.qparams(0.0, 1.0, 2)  # step 1/3: 0.3 lies between codes 0 and 1/3
    codes = q.quantize(x, p, rounding="stochastic", rng=np.random.default_rng(0))
    y = q.dequantize(codes, p)
    np.testing.assert_allclose(np.unique(y), [0.0, 1 / 3], rtol=1e-6)  # both neighbours, nothing else
    assert abs(y.mean() - 0.3) < 0.01          # unbiased
    assert q.fake_quant(x[:1], 0.0, 1.0, 2)[0] == pytest.approx(1 / 3)  # nearest is biased
    t = q.tf_fake_quant(tf.constant(x), 0.0, 1.0, 2, rounding="stochastic", seed=3).numpy()
    assert abs(t.mean() - 0.3) < 0.01
    with pytest.raises(ValueError, match="rounding"):
        q.quantize(x, p, rounding="up")
