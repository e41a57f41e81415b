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
    # The range fills at least num_bins of the 2 * num_bins bins kept (the width is a power of two).
    span = max(b.max() for b in batches) - min(b.min() for b in batches)
    assert span / o.width >= o.num_bins - 1 and np.log2(o.width) == int(np.log2(o.width))


def _mixed_batches(seed):
    """Batches whose range grows, shrinks to one side and jumps (every re-grid case)."""
    rng = np.random.default_rng(seed)
    scales = [0.01, 1.0, 0.5, 40.0, 3.0, 1e-4, 7.0]
    return [(rng.normal(0.3, s, 257) + rng.choice([-1, 1]) * s).astype(np.float32) for s in scales]


METHODS = ["minmax", "percentile", "mse", "entropy", "auto"]


@pytest.mark.parametrize("method", METHODS)
def test_merged_parts_equal_one_pass_in_any_order(method):
    """Order-free observers: parts seen by separate observers (here in another order) merge into exactly
    the observer that saw everything in one pass."""
    acts = schemes.ActivationQuant(method=method, num_bins=256)
    batches = _mixed_batches(1)
    one = _feed(obs.make_observer(acts), batches)
    parts = [_feed(obs.make_observer(acts), batches[i::3]) for i in range(3)]
    merged = obs.make_observer(acts)
    for part in reversed(parts):
        merged.merge(obs.from_state(obs.to_state(part)))  # through the serialized state, as between processes
    if method != "minmax":
        np.testing.assert_array_equal(merged.counts, one.counts)
        assert (merged.width, merged.start) == (one.width, one.start)
    assert merged.range() == one.range()


def test_ema_parts_merge_in_stream_order():
    """The moving average depends on the batch order: consecutive parts merged in order replay it exactly."""
    batches = _mixed_batches(2)
    one = _feed(obs.EMAObserver(0.9), batches)
    first, second = _feed(obs.EMAObserver(0.9), batches[:3]), _feed(obs.EMAObserver(0.9), batches[3:])
    first.merge(obs.from_state(obs.to_state(second)))
    assert first.range() == one.range()


def test_all_zero_tensor_and_empty_merge():
    o = _feed(obs.MSEObserver(), [np.zeros(10, np.float32)])
    o.merge(obs.MSEObserver())  # an observer that saw nothing changes nothing
    assert o.range() == (0.0, 0.0) and o.counts.sum() == 10


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
    once = _feed(obs.EntropyObserver(8, 2048), [np.concatenate(batches)])
    np.testing.assert_array_equal(streamed.counts, once.counts)  # exact re-binning: the same bins
    lo, hi = streamed.range()
    assert (lo, hi) == once.range() and lo == 0.0
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
