"""Range methods against numpy references computed on all the data at once."""

import numpy as np
import pytest

from qtoolkit import quantizers as q
from qtoolkit import schemes
from qtoolkit.calibrate import observers as obs


def _batches(seed=0, n=20, size=500, heavy_tail=False, relu=False):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        x = rng.normal(0.5, 1.0 + 0.05 * i, size).astype(np.float32)
        if heavy_tail:
            x[rng.integers(0, size, 3)] = rng.normal(0, 30, 3)
        out.append(np.maximum(x, 0) if relu else x)
    return out


def _feed(o, batches):
    for b in batches:
        o.update(b)
    return o


def test_minmax_is_exact():
    batches = _batches()
    lo, hi = _feed(obs.MinMaxObserver(), batches).range()
    allx = np.concatenate(batches)
    assert (lo, hi) == (float(allx.min()), float(allx.max()))


def test_ema_follows_the_formula():
    batches = _batches()
    lo, hi = batches[0].min(), batches[0].max()
    for b in batches[1:]:
        lo = 0.9 * lo + 0.1 * b.min()
        hi = 0.9 * hi + 0.1 * b.max()
    got = _feed(obs.EMAObserver(0.9), batches).range()
    np.testing.assert_allclose(got, (lo, hi), rtol=1e-6)


@pytest.mark.parametrize("p", [99.0, 99.9, 99.99])
def test_percentile_matches_numpy(p):
    batches = _batches(heavy_tail=True)
    o = _feed(obs.PercentileObserver(p, 2048), batches)
    allx = np.concatenate(batches)
    bin_width = (o.hi - o.lo) / o.num_bins
    lo, hi = o.range()
    # hi is the p-th percentile to within a bin: at least p% of the samples are
    # <= hi, fewer than p% are <= hi minus two bins (rebinning may blur one bin).
    assert np.mean(allx <= hi) >= p / 100
    assert np.mean(allx <= hi - 2 * bin_width) < p / 100
    assert np.mean(allx >= lo) >= p / 100
    assert np.mean(allx >= lo + 2 * bin_width) < p / 100
    # In the dense part of the distribution that is numpy's percentile.
    if p == 99.0:
        assert abs(hi - np.percentile(allx, p)) <= 2 * bin_width


def test_histogram_rebinning_keeps_every_count():
    batches = _batches(heavy_tail=True)
    o = _feed(obs.HistogramObserver(512), batches)
    assert o.counts.sum() == sum(b.size for b in batches)
    assert o.lo <= min(b.min() for b in batches) and o.hi >= max(b.max() for b in batches)


def _mse_raw(x, lo, hi, bits=8):
    lo_s, hi_s = q.sanitize_range(lo, hi)
    return float(np.mean((x - q.fake_quant(x, lo_s, hi_s, bits)) ** 2))


@pytest.mark.parametrize("bits", [4, 8])
def test_mse_finds_the_brute_force_minimum(bits):
    batches = _batches(heavy_tail=True)
    allx = np.concatenate(batches)
    got = _feed(obs.MSEObserver(bits=bits), batches).range()
    # Brute force on the raw samples over the same candidate grid.
    lo, hi = float(allx.min()), float(allx.max())
    best = min(obs._candidates(lo, hi), key=lambda r: _mse_raw(allx, *r, bits=bits))
    assert _mse_raw(allx, *got, bits=bits) <= 1.05 * _mse_raw(allx, *best, bits=bits)
    # And clipping the outliers beats min/max.
    assert _mse_raw(allx, *got, bits=bits) < _mse_raw(allx, lo, hi, bits=bits)


def test_entropy_streaming_equals_one_shot_and_clips_outliers():
    batches = _batches(heavy_tail=True, relu=True)
    streamed = _feed(obs.EntropyObserver(8, 2048), batches)
    once = obs.EntropyObserver(8, 2048)
    once.lo, once.hi = streamed.lo, streamed.hi
    once.counts = np.histogram(np.concatenate(batches), 2048, (streamed.lo, streamed.hi))[0].astype(np.float64)
    lo, hi = streamed.range()
    assert lo == 0.0
    # Same bins up to the re-binning of early batches: same choice within a few bins.
    assert abs(hi - once.range()[1]) <= 0.05 * (streamed.hi - streamed.lo)
    assert hi < max(b.max() for b in batches) * 0.8  # the outliers are clipped
    # The chosen range has the smallest divergence among the candidates.
    cands = obs._candidates(*streamed.data_range())
    assert streamed.divergence(lo, hi) == min(streamed.divergence(*c) for c in cands)


def test_entropy_keeps_a_saturated_bound():
    """ReLU6 outputs pile up at 6: clipping below would move that whole mass."""
    rng = np.random.default_rng(2)
    x = np.clip(rng.normal(2, 2, 20000), 0, 6).astype(np.float32)
    assert _feed(obs.EntropyObserver(8, 2048), [x]).range()[1] == pytest.approx(6.0, rel=1e-3)


def test_entropy_keeps_the_range_of_uniform_data():
    rng = np.random.default_rng(1)
    o = _feed(obs.EntropyObserver(8, 2048), [rng.uniform(0, 4, 5000).astype(np.float32) for _ in range(5)])
    assert o.range()[1] > 3.6


def test_registry_covers_every_method_and_errors_before_data():
    for method in schemes.RANGE_METHODS:
        o = obs.make_observer(schemes.ActivationQuant(method=method))
        with pytest.raises(obs.NoDataError):
            o.range()
        o.update(np.array([-1.0, 2.0], np.float32))
        lo, hi = o.range()
        assert lo <= 0.0 < hi
