"""`python -m qtoolkit.convert`: run(), main() with flags, and one real subprocess."""

import json
import os
import subprocess
import sys
import zipfile

import numpy as np
import pytest
from absl.testing import flagsaver

import models
from qtoolkit import convert

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    model = models.conv_bn_relu((8, 8, 1))
    model.save(d / "model.keras")
    rng = np.random.default_rng(0)
    np.save(d / "calib.npy", rng.uniform(0, 1, (120, 8, 8, 1)).astype(np.float32))
    return d


def _main(**flags):
    with flagsaver.flagsaver(**flags):
        return convert.main(["convert"])


def test_run_converts_and_writes_report(files, tmp_path, capsys):
    out, report = tmp_path / "m.tflite", tmp_path / "r.json"
    result = convert.run(str(files / "model.keras"), str(out), str(files / "calib.npy"), report=str(report))
    printed = capsys.readouterr().out
    assert "float vs TFLite" in printed and "SQNR (dB)" in printed and "no float ops" in printed
    data = json.loads(report.read_text())
    assert data["inspection"]["fully_quantized"] and data["inspection"]["all_weights_per_channel"]
    assert data["comparisons"]["float vs TFLite"]["samples"] == result.comparisons["float vs TFLite"].samples
    # Default split: 1/5 of 120 held out, the rest calibrates.
    assert data["calibration"]["samples"] == 96 and result.comparisons["float vs TFLite"].samples == 24
    assert out.read_bytes() == result.tflite


def test_main_with_flags_and_options(files, tmp_path):
    out, report = tmp_path / "m.tflite", tmp_path / "r.json"
    rc = _main(model=str(files / "model.keras"), output=str(out), calibration_data=str(files / "calib.npy"),
               scheme="int8_per_tensor", range_method="percentile", num_calibration_samples=50,
               num_verification_samples=20, io_dtype="uint8", report=str(report))
    assert rc == 0 and out.exists()
    data = json.loads(report.read_text())
    # Each flag took effect: the scheme (one weight scale per tensor), the range method, both sample counts
    # and the I/O dtype, read back from the report and from the written flatbuffer itself.
    assert data["scheme"]["name"] == "int8_per_tensor"
    weights = data["inspection"]["weights"]
    assert weights and all(w["num_scales"] == 1 for w in weights)
    assert data["calibration"]["method"] == "percentile" and data["calibration"]["samples"] == 50
    assert all(c["samples"] == 20 for c in data["comparisons"].values())
    assert data["inspection"]["input_dtypes"] == ["uint8"] and data["inspection"]["output_dtypes"] == ["uint8"]
    from qtoolkit import export

    written = export.inspect(out.read_bytes())
    assert written.input_dtypes == ["uint8"] and not any(w.per_channel for w in written.weights)


def _corrupt_keras(path):
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("metadata.json", "{}")
    return path


BAD = [
    # (flag overrides, fragment of the one-line error)
    (dict(model="missing.keras"), "does not exist"),
    (dict(model="__folder__"), "not a SavedModel"),
    (dict(model="__corrupt__"), "cannot load the model"),
    (dict(model="__keras3__"), "Keras 3"),
    (dict(calibration_data="missing.npy"), "does not exist"),
    (dict(calibration_data="__wrong_shape__"), "expects samples of shape (8, 8, 1)"),
    (dict(calibration_data="__nan__"), "NaN or Inf in sample 3"),
    (dict(calibration_data="__empty__"), "no samples"),
    (dict(calibration_data="__strings__"), "must be numeric"),
    (dict(num_calibration_samples=500), "fewer than the 500 calibration"),
    (dict(scheme="__bad_scheme__"), "unknown key weights.bitz"),
    (dict(scheme="int7"), "unknown scheme 'int7'"),
    (dict(output="/nonexistent-folder/m.tflite"), "does not exist; create it first"),
    (dict(output="__dir__"), "is a folder"),
]


@pytest.mark.parametrize("overrides,fragment", BAD, ids=[b[1][:24] for b in BAD])
def test_bad_input_one_clear_error_nothing_written(files, tmp_path, capsys, overrides, fragment):
    flags = dict(model=str(files / "model.keras"), output=str(tmp_path / "m.tflite"),
                 calibration_data=str(files / "calib.npy"))
    special = {
        "__folder__": lambda: str(tmp_path),
        "__corrupt__": lambda: str(_corrupt_keras(tmp_path / "bad.keras")),
        "__keras3__": lambda: _keras3(tmp_path / "k3.keras"),
        "__wrong_shape__": lambda: _npy(tmp_path, np.zeros((10, 8, 8, 3), np.float32)),
        "__nan__": lambda: _npy(tmp_path, _with_nan()),
        "__empty__": lambda: _npy(tmp_path, np.zeros((0, 8, 8, 1), np.float32)),
        "__strings__": lambda: _npy(tmp_path, np.array([["a"] * 64] * 4).reshape(4, 8, 8, 1)),
        "__bad_scheme__": lambda: _text(tmp_path / "s.yaml", "weights:\n  bitz: 8\n"),
        "__dir__": lambda: str(tmp_path),
    }
    for key, value in overrides.items():
        flags[key] = special[value]() if value in special else value
    before = sorted(os.listdir(tmp_path))
    rc = _main(**flags)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1
    assert len(err) == 1 and err[0].startswith("error: ") and fragment in err[0], err
    assert sorted(os.listdir(tmp_path)) == before  # nothing written, no temp file left


def _npy(folder, array):
    path = folder / "data.npy"
    np.save(path, array)
    return str(path)


def _with_nan():
    x = np.random.default_rng(0).uniform(0, 1, (120, 8, 8, 1)).astype(np.float32)
    x[3, 2, 2, 0] = np.inf
    return x


def _text(path, text):
    path.write_text(text)
    return str(path)


def _keras3(path):
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("metadata.json", json.dumps({"keras_version": "3.15.1"}))
        z.writestr("config.json", "{}")
    return str(path)


def test_missing_flags_is_a_usage_error(files):
    from absl import app

    with pytest.raises(app.UsageError, match="--output"):
        _main(model=str(files / "model.keras"), calibration_data=str(files / "calib.npy"), output=None)


def test_help_lists_the_flags():
    helptext = subprocess.run([sys.executable, "-m", "qtoolkit.convert", "--help"], capture_output=True,
                              text=True, cwd=ROOT, timeout=300)
    assert "--calibration_data" in helptext.stdout and "--scheme" in helptext.stdout


# The default suite must stay under 3 minutes on 2 cores: scripts/demo.sh runs this same command line on every
# fresh check; runs in the accuracy-regression workflow.
@pytest.mark.slow
def test_command_line_subprocess(files, tmp_path):
    out = tmp_path / "m.tflite"
    base = [sys.executable, "-m", "qtoolkit.convert", "--model", str(files / "model.keras"),
            "--calibration_data", str(files / "calib.npy")]
    ok = subprocess.run(base + ["--output", str(out)], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "float vs TFLite" in ok.stdout and out.exists()
    # Bad input through the real command line: tests/test_robustness.py::test_bad_input_command_line.
