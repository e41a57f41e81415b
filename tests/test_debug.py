"""Per-layer debugger and automatic mixed precision (qtoolkit.debug)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from qtoolkit import debug
import tf_keras as keras

L = keras.layers


def _model(damage=False):
    keras.utils.set_random_seed(0)
    inp = keras.Input((12, 12, 3))
    x = L.Conv2D(8, 3, padding="same", activation="relu", name="c1")(inp)
    x = L.Conv2D(8, 3, padding="same", activation="relu", name="c2")(x)
    x = L.Conv2D(8, 3, padding="same", activation="relu", name="c3")(x)
    x = L.GlobalAveragePooling2D(name="gap")(x)
    out = L.Dense(4, name="fc")(x)
    model = keras.Model(inp, out)
    if damage:  # one huge weight: c2's output range explodes, its other channels lose all resolution
        k, b = model.get_layer("c2").get_weights()
        k[0, 0, 0, 0] = 200.0
        model.get_layer("c2").set_weights([k, b])
    return model


X = np.random.default_rng(0).uniform(0, 1, (160, 12, 12, 3)).astype(np.float32)


def _assert_tflite_ranks_first(report, name):
    """`name` has the lowest local SQNR measured in the TFLite file, and every layer was measured there."""
    unmatched = [e.name for e in report.layers if e.tflite_local_sqnr is None]
    assert not unmatched, f"no TFLite tensor matched for {unmatched}"
    worst = min(report.layers, key=lambda e: e.tflite_local_sqnr)
    assert worst.name == name and np.isfinite(worst.tflite_local_sqnr), worst


def test_damaged_layer_ranked_first_in_simulation_and_tflite(tmp_path):
    out = str(tmp_path / "report")
    report = debug.analyze(_model(damage=True), X, "int8", out, num_calibration_samples=100, num_samples=60)
    assert report.layers[0].name == "c2"   # sensitivity ranking (simulated)
    assert min(report.layers, key=lambda e: e.sim_local_sqnr).name == "c2"
    _assert_tflite_ranks_first(report, "c2")
    assert report.layers[0].sensitivity_sqnr < report.layers[1].sensitivity_sqnr - 10
    files = set(os.listdir(out))
    assert {"index.html", "report.md", "report.json", "sqnr_sensitivity.png", "sqnr_cumulative.png",
            "weights_c2.png", "hist_c2.png"} <= files
    data = json.load(open(os.path.join(out, "report.json")))
    assert data["layers"][0]["name"] == "c2"
    page = open(os.path.join(out, "index.html")).read()
    assert all(f'src="{f}"' in page for f in files if f.endswith(".png"))


def test_tflite_tensors_match_simulated_on_undamaged_model():
    report = debug.analyze(_model(), X, "int8", num_calibration_samples=100, num_samples=60)
    for e in report.layers:
        assert e.tflite_sqnr is not None, f"{e.name}: no TFLite tensor matched"
        assert abs(e.tflite_sqnr - e.sim_sqnr) < 3.0, e
    assert abs(report.output_sqnr["tflite"] - report.output_sqnr["simulated"]) < 3.0


@pytest.mark.slow  # the default suite must stay under 3 minutes on 2 cores; runs in the accuracy-regression workflow
def test_int16x8_ranks_damaged_weights_first_and_other_layers_gain():
    # The outlier wrecks c2's per-channel int8 weight grid, which 16-bit activations do not fix.
    r8 = debug.analyze(_model(damage=True), X, "int8", tflite=False, num_calibration_samples=100, num_samples=40)
    r16 = debug.analyze(_model(damage=True), X, "int16x8", num_calibration_samples=100, num_samples=40)
    assert r16.layers[0].name == "c2"
    _assert_tflite_ranks_first(r16, "c2")  # the int16x8 TFLite file too
    s8 = {e.name: e.sensitivity_sqnr for e in r8.layers}
    s16 = {e.name: e.sensitivity_sqnr for e in r16.layers}
    assert s16["gap"] > s8["gap"] + 20   # an activation-only quantizer: 8 more bits, about 48 dB more


def test_int16x8_tflite_tensors_match_simulated_on_undamaged_model():
    report = debug.analyze(_model(), X, "int16x8", num_calibration_samples=100, num_samples=40)
    for e in report.layers:
        assert e.tflite_sqnr is not None, f"{e.name}: no TFLite tensor matched"
        assert abs(e.tflite_sqnr - e.sim_sqnr) < 3.0, e
    assert report.output_sqnr["tflite"] > 40  # 16-bit activations: well above int8's


def test_mixed_precision_meets_budget_plain_int8_misses(tmp_path):
    out = str(tmp_path / "mp.tflite")
    mp = debug.mixed_precision(_model(damage=True), X, "int8", out, budget_min_sqnr=30.0,
                               num_calibration_samples=100, num_samples=60)
    assert not mp.choices[0].meets_budget and mp.choices[0].kept_float == ()
    assert mp.met and mp.kept_float[0] == "c2" and mp.choices[-1].sqnr_db >= 30.0
    assert open(out, "rb").read() == mp.tflite
    assert all(c.size_bytes > 0 and c.latency_ms > 0 for c in mp.choices)
    assert "c2" in mp.summary()


def test_mixed_precision_needs_exactly_one_budget():
    with pytest.raises(ValueError, match="exactly one budget"):
        debug.mixed_precision(_model(), X, "int8")
    with pytest.raises(ValueError, match="labels"):
        debug.mixed_precision(_model(), X, "int8", budget_max_accuracy_drop=1.0)


def test_main_bad_input_is_one_error_line(tmp_path, capsys):
    """In-process (the real command line: test_cli_bad_input_is_one_error_line, in -m slow)."""
    from absl.testing import flagsaver

    from qtoolkit.debug.__main__ import main

    with flagsaver.flagsaver(model=str(tmp_path / "missing.keras"), calibration_data="x.npy",
                             output=str(tmp_path / "r")):
        assert main(["debug"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "does not exist" in err[0]
    assert not (tmp_path / "r").exists()


@pytest.mark.slow  # a process start
def test_cli_bad_input_is_one_error_line(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(debug.__file__))))  # qtoolkit/debug/
    env = {**os.environ, "PYTHONPATH": root}
    r = subprocess.run([sys.executable, "-m", "qtoolkit.debug", "--model", str(tmp_path / "missing.keras"),
                        "--calibration_data", "x.npy", "--output", str(tmp_path / "r")],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 1, r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error:")


@pytest.mark.slow  # the default suite stays under 3 minutes on 2 cores (accuracy-regression workflow runs it)
def test_convert_prints_worst_layers_and_mixed_precision_budget(tmp_path, capsys):
    from qtoolkit import convert

    path, calib, out = str(tmp_path / "m.keras"), str(tmp_path / "calib.npy"), str(tmp_path / "m.tflite")
    _model(damage=True).save(path)
    np.save(calib, X)
    convert.run(path, out, calib, num_calibration_samples=100, num_verification_samples=60, budget_min_sqnr=30.0)
    text = capsys.readouterr().out
    worst = text.split("most sensitive layers")[1]
    assert worst.splitlines()[1].strip().startswith("1. c2:")
    assert "python -m qtoolkit.debug --model" in text
    assert "met keeping 1 layer(s) float: c2" in text
    with pytest.raises(convert.UsageError, match="needs --labels"):
        convert.run(path, out, calib, budget_max_accuracy_drop=1.0)


def test_convert_with_a_budget_loads_rewrites_and_calibrates_once(tmp_path, monkeypatch, capsys):
    """The prepared state is built once and handed to the export, the per-layer summary and mixed precision."""
    import importlib

    from qtoolkit import convert

    path, calib, out = str(tmp_path / "m.keras"), str(tmp_path / "calib.npy"), str(tmp_path / "m.tflite")
    _model(damage=True).save(path)
    np.save(calib, X)
    calls = {"load": 0, "rewrite": 0, "calibrate": 0}

    def counted(stage, function):
        def wrapper(*args, **kwargs):
            calls[stage] += 1
            return function(*args, **kwargs)
        return wrapper

    # Every name under which the three stages can be reached.
    for stage, module, name in [("load", "qtoolkit.loading", "load_model"), ("load", "qtoolkit.prepare", "load_model"),
                                ("rewrite", "qtoolkit.rewrite", "rewrite"),
                                ("rewrite", "qtoolkit.rewrite.rewriter", "rewrite"),
                                ("calibrate", "qtoolkit.calibrate", "calibrate"),
                                ("calibrate", "qtoolkit.calibrate.calibrator", "calibrate")]:
        m = importlib.import_module(module)
        monkeypatch.setattr(m, name, counted(stage, getattr(m, name)))
    convert.run(path, out, calib, num_calibration_samples=100, num_verification_samples=60, budget_min_sqnr=30.0)
    assert "met keeping 1 layer(s) float: c2" in capsys.readouterr().out  # the summary and the search both ran
    assert calls == {"load": 1, "rewrite": 1, "calibrate": 1}


def test_convert_with_separate_verification_data_ranks_layers_on_it(tmp_path, capsys):
    """All the calibration data calibrates; the per-layer summary runs on the verification data (no hint)."""
    from qtoolkit import convert

    path, calib, ver = str(tmp_path / "m.keras"), str(tmp_path / "calib.npy"), str(tmp_path / "ver.npy")
    _model(damage=True).save(path)
    np.save(calib, X[:100])
    np.save(ver, X[100:])
    convert.run(path, None, calib, verification_data=ver)
    text = capsys.readouterr().out
    assert "skipped" not in text
    assert "most sensitive layers (only that layer quantized, 60 samples)" in text
    assert text.split("most sensitive layers")[1].splitlines()[1].strip().startswith("1. c2:")


def test_weight_only_scheme_is_a_clear_error():
    with pytest.raises(debug.DebugError, match="quantizes only weights"):
        debug.analyze(_model(), X, "weight_only_int8")
