"""The "auto" range method: each activation range min/max or MSE, by the output error of the model."""

import numpy as np
import pytest
import tf_keras as keras

from qtoolkit import calibrate, rewrite, schemes
from qtoolkit.calibrate import calibrator, select
from qtoolkit.calibrate import observers as obs

AUTO = schemes.load("int8").replace(activations={"method": "auto"})
# 4-bit activations: a coarse grid, where MSE clips rare spikes hard (at 8 bits it takes ~1e6 values per spike).
AUTO4 = AUTO.replace(activations={"bits": 4})
D = 256  # input features
N = 256  # calibration samples: the last 128 are held out for the choice


def _spiky_inputs(seed=0):
    """A narrow bulk N(0, 0.3) in every feature and, in feature 0 of 4 samples (2 in each half), a spike of 10.

    The spikes are 4 values in 65,536: with 4 bits MSE clips them (a finer grid for the bulk is worth more
    than their clipping error), min/max keeps them.
    """
    rng = np.random.default_rng(seed)
    x = rng.normal(0.0, 0.3, (N, D)).astype(np.float32)
    x[[20, 90, 150, 220], 0] = 10.0
    return x


def _linear(weights, seed=0):
    """Input (D,) -> Dense(1) with the given weights: the input quantizer sees the spikes."""
    inp = keras.Input((D,), name="x")
    out = keras.layers.Dense(1, name="head")(inp)
    model = keras.Model(inp, out)
    model.get_layer("head").set_weights([np.asarray(weights, np.float32).reshape(D, 1), np.zeros(1, np.float32)])
    return model


def _calibrate(model, x, scheme=AUTO):
    rewritten = rewrite.rewrite(model, scheme)
    source = calibrate.open_source(x, [("x", (None, *x.shape[1:]), np.float32)])
    return rewritten, calibrate.calibrate(rewritten, source, len(x), scheme, progress=False)


def _input_quant(rewritten):
    return rewritten.quant_points[0]


def _sqnr(rewritten, x):
    ref = rewritten.float_model.predict(x, verbose=0)[0]
    out = rewritten.model.predict(x, verbose=0)
    return 10 * np.log10(np.sum(ref ** 2) / np.sum((ref - out) ** 2))


def test_the_observer_keeps_both_candidates():
    x = _spiky_inputs()
    o = obs.make_observer(AUTO4.activations)
    assert isinstance(o, obs.AutoObserver)
    for i in range(0, N, 32):
        o.update(x[i:i + 32])
    c = o.candidates()
    assert c["minmax"] == (float(x.min()), float(x.max()))
    mse = obs.MSEObserver(bits=4)
    for i in range(0, N, 32):
        mse.update(x[i:i + 32])
    assert c["mse"] == mse.range() == o.range()
    assert c["mse"][1] < 0.5 * c["minmax"][1]  # MSE clips the spikes


def test_minmax_where_clipping_an_outlier_hurts_the_output():
    # The output is the spike feature: clipping the spikes costs most of the output's signal.
    w = np.full(D, 0.01)
    w[0] = 1.0
    x = _spiky_inputs()
    rewritten, cal = _calibrate(_linear(w), x, AUTO4)
    name = _input_quant(rewritten)
    assert cal.method == "auto" and cal.selection.choice[name] == "minmax"
    assert cal.ranges[name][1] == pytest.approx(10.0, rel=1e-3)  # the full range, spikes kept
    e = cal.selection.error
    assert e["auto"] <= min(e["minmax"], e["mse"])
    assert e["mse"] > 4 * e["minmax"]


def test_mse_where_clipping_helps_the_output():
    # The spike feature does not reach the output: a finer grid for the others is all that counts.
    rng = np.random.default_rng(1)
    w = rng.normal(0, 1, D) / np.sqrt(D)
    w[0] = 0.0
    x = _spiky_inputs()
    rewritten, cal = _calibrate(_linear(w), x, AUTO4)
    name = _input_quant(rewritten)
    assert cal.selection.choice[name] == "mse"
    assert cal.ranges[name][1] < 5.0
    e = cal.selection.error
    assert e["auto"] <= min(e["minmax"], e["mse"]) and e["mse"] < e["minmax"]


def _small_cnn(seed=0):
    keras.utils.set_random_seed(seed)
    inp = keras.Input((8, 8, 3), name="x")
    a = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="a")(inp)
    b = keras.layers.Conv2D(8, 3, padding="same", name="b")(inp)
    c = keras.layers.Concatenate(name="concat")([a, b])
    c = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="c")(c)
    d = keras.layers.GlobalAveragePooling2D(name="gap")(c)
    return keras.Model(inp, keras.layers.Dense(4, name="out")(d))


def _heavy_inputs(n=192, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_t(3, (n, 8, 8, 3)).astype(np.float32)


def test_never_worse_than_both_pure_methods_on_the_simulated_model():
    model, x = _small_cnn(), _heavy_inputs()
    rewritten, cal = _calibrate(model, x)
    e = cal.selection.error
    # On the held-out samples: never worse than min/max (the start unless MSE is better beyond noise), nor
    # than MSE when it was the start.
    assert e["auto"] <= e["minmax"] and e["auto"] <= max(e["minmax"], e["mse"])
    assert e["auto"] <= e[cal.selection.start]
    assert set(cal.selection.choice) == set(rewritten.quant_points)
    # The final ranges (from all the samples) on all the samples, against each pure method's.
    sqnr = {"auto": _sqnr(rewritten, x)}
    for method in ("minmax", "mse"):
        r, _ = _calibrate(model, x, AUTO.replace(activations={"method": method}))
        sqnr[method] = _sqnr(r, x)
    assert sqnr["auto"] >= min(sqnr["minmax"], sqnr["mse"]) - 0.1, sqnr


def test_tied_quantizers_get_one_choice_and_one_range():
    model, x = _small_cnn(), _heavy_inputs()
    rewritten, cal = _calibrate(model, x)
    groups = calibrator._tie_groups(rewritten.tied_points)
    assert groups and any(len(g) > 1 for g in groups)
    for group in groups:
        assert len({cal.selection.choice[n] for n in group}) == 1, group
        assert len({cal.ranges[n] for n in group}) == 1, group


def test_a_tie_group_is_one_unit_with_the_union_of_its_ranges():
    rewritten = rewrite.rewrite(_small_cnn(), AUTO)
    names = rewritten.quant_points
    groups = calibrator._tie_groups(rewritten.tied_points)
    ranges = {n: {"minmax": (-4.0 - i, 4.0), "mse": (-2.0, 2.0 + i)} for i, n in enumerate(names)}
    units = calibrator._units(names, ranges, groups)
    assert sorted(n for u in units for n in u.names) == sorted(names)  # each quantizer in one unit
    tied = [u for u in units if len(u.names) > 1]
    assert {frozenset(u.names) for u in tied} == {frozenset(g) for g in groups if len(g) > 1}
    for u in tied:
        for m in ("minmax", "mse"):
            assert u.ranges[m] == (min(ranges[n][m][0] for n in u.names), max(ranges[n][m][1] for n in u.names))


def test_a_time_budget_flips_blocks_and_keeps_the_guarantee():
    model, x = _small_cnn(), _heavy_inputs()
    rewritten = rewrite.rewrite(model, AUTO)
    names = rewritten.quant_points
    groups = calibrator._tie_groups(rewritten.tied_points)
    lo = {n: (-1.0, 1.0) for n in names}
    hi = {n: (-6.0, 6.0) for n in names}
    units = calibrator._units(names, {n: {"minmax": hi[n], "mse": lo[n]} for n in names}, groups)
    ref = rewritten.float_model.predict(x, verbose=0)[:1]
    sel = select.select_ranges(rewritten, [x], ref, units, 8, max_seconds=0.0, progress=False)
    assert sel.samples == 32 and sel.blocks == 1  # the fewest samples, then all flips in one block
    assert sel.error["auto"] <= sel.error[sel.start] <= sel.error["minmax"]


def test_noise_level_gains_are_not_flips():
    rng = np.random.default_rng(0)
    current = rng.uniform(1, 2, 100)
    noisy = current + rng.normal(0, 0.5, 100)  # as often better as worse, per sample
    noisy += (current - noisy).mean()  # on average slightly better: a gain of ~0 with a large spread
    noisy -= 0.001
    assert not select.better(noisy, current, 0.0, 1.0)
    assert select.better(noisy, current, 0.0, 0.0)  # without the noise test it would flip
    assert select.better(current * 0.9, current, 0.002, 1.0)
    assert not select.better(current * 0.999, current, 0.002, 1.0)  # below min_gain
    assert not select.better(np.full(100, np.inf), current, 0.002, 1.0)


def test_multi_output_error_is_the_sum_of_each_outputs_noise_over_signal():
    a, b = np.ones((4, 3)), np.full((4, 2), 100.0)
    e = select.output_error([a, b], [a * 1.1, b * 0.99])
    assert e.shape == (4,)
    assert e.sum() == pytest.approx(0.1 ** 2 + 0.01 ** 2)


def test_auto_is_a_scheme_method_and_a_regular_observer_elsewhere():
    assert "auto" in schemes.RANGE_METHODS
    assert schemes.load("int8").replace(activations={"method": "auto"}).activations.method == "auto"
    # Too few samples to hold any out: the MSE ranges, no selection.
    model = _linear(np.ones(D) / D)
    x = _spiky_inputs()[:1]
    _, cal = _calibrate(model, x)
    assert cal.selection is None and cal.method == "auto"
