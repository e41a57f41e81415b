"""Hardening: every bad input through run()/main() and the real command line,
unsafe model files, interruption, disk full, determinism, size limits, streaming."""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tf_keras as keras
from absl.testing import flagsaver

import models
from qtoolkit import calibrate, convert, export
from qtoolkit.pipeline import ptq

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MARKER_CODE = "lambda x: (__import__('pathlib').Path({path!r}).touch(), x)[1]"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("robust")
    model = models.conv_bn_relu((8, 8, 1))
    model.save(d / "model.keras")
    model.save(d / "model.h5")
    model.save(d / "saved_model")
    rng = np.random.default_rng(0)
    np.save(d / "calib.npy", rng.uniform(0, 1, (120, 8, 8, 1)).astype(np.float32))
    a, b = keras.Input((4,), name="a"), keras.Input((4,), name="b")
    keras.Model([a, b], keras.layers.Dense(2)(keras.layers.Concatenate()([a, b]))).save(d / "two_inputs.keras")
    # A Keras 3 file with a layer tf_keras does not have (the `keras` package is Keras 3 beside tf_keras).
    import keras as keras3

    inp = keras3.Input((8, 8, 1))
    out = keras3.layers.Dense(2)(keras3.layers.Flatten()(keras3.layers.RMSNormalization(name="rms")(inp)))
    keras3.Model(inp, out).save(d / "keras3_custom.keras")
    return d


def _truncate(src, dst, fraction=0.5):
    data = open(src, "rb").read()
    open(dst, "wb").write(data[:int(len(data) * fraction)])
    return str(dst)


def _npy(folder, array, name="data.npy"):
    np.save(folder / name, array)
    return str(folder / name)


def _text(path, text):
    path.write_text(text)
    return str(path)


def _broken_saved_model(files, tmp):
    dst = tmp / "broken_sm"
    shutil.copytree(files / "saved_model", dst)
    _truncate(dst / "saved_model.pb", dst / "saved_model.pb", 0.3)
    return str(dst)


def _calib_with(value):
    x = np.random.default_rng(0).uniform(0, 1, (120, 8, 8, 1)).astype(np.float32)
    x[3, 2, 2, 0] = value
    return x


# (case id, flag overrides built from (files, tmp), fragment of the one error line)
CASES = [
    ("missing model", lambda f, t: dict(model=str(t / "missing.keras")), "does not exist"),
    ("folder not SavedModel", lambda f, t: dict(model=str(t)), "not a SavedModel"),
    ("truncated .keras", lambda f, t: dict(model=_truncate(f / "model.keras", t / "m.keras")), "not a valid .keras"),
    ("truncated .h5", lambda f, t: dict(model=_truncate(f / "model.h5", t / "m.h5")), "cannot load the model"),
    ("truncated SavedModel", lambda f, t: dict(model=_broken_saved_model(f, t)), "cannot load the SavedModel"),
    ("Keras 3 custom layer", lambda f, t: dict(model=str(f / "keras3_custom.keras")),
     "(keras.ops RMSNorm) in the Keras 3 graph has no TensorFlow counterpart"),
    ("two inputs, one .npy", lambda f, t: dict(model=str(f / "two_inputs.keras")), "2 inputs (a, b)"),
    ("wrong rank", lambda f, t: dict(calibration_data=_npy(t, np.zeros((10, 64), np.float32))),
     "expects samples of shape (8, 8, 1)"),
    ("wrong shape", lambda f, t: dict(calibration_data=_npy(t, np.zeros((10, 8, 8, 3), np.float32))),
     "got array shape (10, 8, 8, 3)"),
    ("wrong dtype", lambda f, t: dict(calibration_data=_npy(t, np.full((10, 8, 8, 1), "x"))), "must be numeric"),
    ("NaN", lambda f, t: dict(calibration_data=_npy(t, _calib_with(np.nan))), "NaN or Inf in sample 3"),
    ("Inf", lambda f, t: dict(calibration_data=_npy(t, _calib_with(np.inf))), "NaN or Inf in sample 3"),
    ("empty file", lambda f, t: dict(calibration_data=_text(t / "empty.npy", "")), "not a readable .npy"),
    ("empty array", lambda f, t: dict(calibration_data=_npy(t, np.zeros((0, 8, 8, 1), np.float32))), "no samples"),
    ("too few samples", lambda f, t: dict(num_calibration_samples=500), "fewer than the 500 calibration"),
    ("scheme unknown key", lambda f, t: dict(scheme=_text(t / "s.yaml", "weights:\n  bitz: 8\n")),
     "unknown key weights.bitz"),
    ("scheme wrong type", lambda f, t: dict(scheme=_text(t / "s.yaml", "weights:\n  bits: eight\n")),
     "weights.bits must be int"),
    ("scheme bits 1", lambda f, t: dict(scheme=_text(t / "s.yaml", "activations:\n  bits: 1\n")),
     "activations.bits must be an integer from 2 to 16"),
    ("output folder missing", lambda f, t: dict(output=str(t / "nope" / "m.tflite")), "does not exist"),
    ("output not writable", lambda f, t: dict(output="/proc/qtoolkit-test.tflite"), "is not writable"),
    ("output is a folder", lambda f, t: dict(output=str(t)), "is a folder"),
]


def _flags(files, tmp, build):
    flags = dict(model=str(files / "model.keras"), output=str(tmp / "out" / "m.tflite"),
                 calibration_data=str(files / "calib.npy"))
    (tmp / "out").mkdir(exist_ok=True)
    (tmp / "out" / "m.tflite").write_bytes(b"previous model")
    flags.update(build(files, tmp))
    return flags


def _snapshot(tmp):
    return {p: open(os.path.join(r, p), "rb").read() if os.path.isfile(os.path.join(r, p)) else None
            for r, _, fs in os.walk(tmp) for p in fs}


@pytest.mark.parametrize("case,build,fragment", CASES, ids=[c[0] for c in CASES])
def test_bad_input_run(files, tmp_path, capsys, case, build, fragment):
    flags = _flags(files, tmp_path, build)
    before = _snapshot(tmp_path)
    with flagsaver.flagsaver(**flags):
        rc = convert.main(["convert"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1
    assert len(err) == 1 and err[0].startswith("error: ") and fragment in err[0], err
    assert _snapshot(tmp_path) == before  # nothing written, the old output untouched, no temp file


# The real command line costs a process start (TensorFlow import) per case: the default suite runs one case;
# every case runs in-process above and through the CLI in `-m slow`.
CLI_FAST = {"truncated .keras"}


@pytest.mark.parametrize("case,build,fragment", [
    pytest.param(*c, marks=() if c[0] in CLI_FAST else pytest.mark.slow) for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_command_line(files, tmp_path, case, build, fragment):
    flags = _flags(files, tmp_path, build)
    before = _snapshot(tmp_path)
    argv = [sys.executable, "-m", "qtoolkit.convert"] + [f"--{k}={v}" for k, v in flags.items()]
    proc = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 1, proc.stderr[-1500:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], lines
    assert "Traceback" not in proc.stderr + proc.stdout
    assert _snapshot(tmp_path) == before


def test_verbose_shows_the_traceback(files, tmp_path):
    from qtoolkit import loading

    flags = dict(model=f"{tmp_path}/missing.keras", output=f"{tmp_path}/m.tflite",
                 calibration_data=f"{files}/calib.npy")
    with flagsaver.flagsaver(**flags, verbose=True):  # the error propagates: absl prints its traceback
        with pytest.raises(loading.ModelLoadError, match="does not exist"):
            convert.main(["convert"])


@pytest.mark.slow
def test_verbose_shows_the_traceback_command_line(files, tmp_path):
    argv = [sys.executable, "-m", "qtoolkit.convert", f"--model={tmp_path}/missing.keras",
            f"--output={tmp_path}/m.tflite", f"--calibration_data={files}/calib.npy", "--verbose"]
    proc = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode != 0 and "Traceback" in proc.stderr


# ------------------------------------------------------------- unsafe files

@pytest.mark.parametrize("fmt", ["keras", pytest.param("h5", marks=pytest.mark.slow),
                                 pytest.param("saved_model", marks=pytest.mark.slow)])
def test_lambda_layers_are_refused_and_never_run(tmp_path, fmt):
    marker = tmp_path / "MARKER"
    inp = keras.Input((8, 8, 1))
    out = keras.layers.Lambda(eval(MARKER_CODE.format(path=str(marker))), name="evil")(inp)  # noqa: S307 (test)
    model = keras.Model(inp, keras.layers.Flatten()(out))
    path = tmp_path / ("evil" if fmt == "saved_model" else f"evil.{fmt}")
    model.save(path)
    marker.unlink(missing_ok=True)  # saving traced the lambda; loading must not
    np.save(tmp_path / "c.npy", np.zeros((10, 8, 8, 1), np.float32))
    proc = subprocess.run([sys.executable, "-m", "qtoolkit.convert", f"--model={path}",
                           f"--output={tmp_path}/m.tflite", f"--calibration_data={tmp_path}/c.npy"],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 1
    assert "Lambda layer(s) evil" in proc.stderr and "--allow_unsafe_deserialization" in proc.stderr
    assert not marker.exists()
    assert not (tmp_path / "m.tflite").exists()


def test_yaml_and_npy_are_read_safely(tmp_path):
    import inspect

    from qtoolkit import loading, schemes
    from qtoolkit.calibrate import data

    for module in (schemes, data, loading, convert):
        src = inspect.getsource(module)
        assert "yaml.load(" not in src and "pickle" not in src.replace("allow_pickle=False", "")
        assert "eval(" not in src and "exec(" not in src
    obj = np.array([{"a": 1}], dtype=object)
    np.save(tmp_path / "obj.npy", obj, allow_pickle=True)
    with pytest.raises(calibrate.DataError, match="not a readable"):
        calibrate.open_source(str(tmp_path / "obj.npy"), [("x", (None, 1), np.float32)])


# ------------------------------------------------------ interruption, disk full

def test_sigterm_mid_run_exits_130_and_writes_nothing(files, tmp_path, capsys, monkeypatch):
    """In-process: SIGTERM arrives during calibration (the command-line version is in the slow suite)."""
    out = tmp_path / "m.tflite"
    out.write_bytes(b"previous model")
    from qtoolkit import calibrate as cal

    real = cal.calibrate

    def calibrate_then_terminated(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # handled by qtoolkit._cli.run: becomes KeyboardInterrupt here
        time.sleep(5)
        return real(*args, **kwargs)

    monkeypatch.setattr(cal, "calibrate", calibrate_then_terminated)
    with flagsaver.flagsaver(model=str(files / "model.keras"), output=str(out),
                             calibration_data=str(files / "calib.npy")):
        rc = convert.main(["convert"])
    assert rc == 130
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: interrupted; nothing was written")
    assert out.read_bytes() == b"previous model"
    assert sorted(os.listdir(tmp_path)) == ["m.tflite"]


@pytest.mark.slow  # a real process killed mid-calibration, by both signals
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_run_leaves_nothing(files, tmp_path, sig):
    np.save(tmp_path / "big.npy", np.random.default_rng(0).uniform(0, 1, (60000, 8, 8, 1)).astype(np.float32))
    out = tmp_path / "m.tflite"
    out.write_bytes(b"previous model")
    proc = subprocess.Popen([sys.executable, "-m", "qtoolkit.convert", f"--model={files}/model.keras",
                             f"--output={out}", f"--calibration_data={tmp_path}/big.npy",
                             "--num_calibration_samples=59000", "--batch_size=1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    for line in proc.stdout:  # wait until calibration has started
        if line.startswith("calibrating"):
            break
    time.sleep(1.0)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-1500:]
    assert err.strip().splitlines()[-1].startswith("error: interrupted; nothing was written")
    assert out.read_bytes() == b"previous model"
    assert sorted(os.listdir(tmp_path)) == ["big.npy", "m.tflite"]


def test_disk_full_at_write_time(files, tmp_path, monkeypatch):
    out = tmp_path / "m.tflite"
    out.write_bytes(b"previous model")
    real_fdopen = os.fdopen

    class Full:
        def __init__(self, fd):
            self.f = real_fdopen(fd, "wb")

        def write(self, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr(export.os, "fdopen", lambda fd, mode: Full(fd))
    with pytest.raises(export.ExportError, match="No space left on device"):
        ptq(str(files / "model.keras"), str(files / "calib.npy"), "int8", str(out), progress=False)
    assert out.read_bytes() == b"previous model"
    assert sorted(os.listdir(tmp_path)) == ["m.tflite"]


# ------------------------------------------------------- determinism, limits

@pytest.mark.slow  # two CLI processes; tests/test_pipeline.py checks determinism within one process
def test_byte_identical_across_processes(files, tmp_path):
    outputs = []
    for i in range(2):
        out, report = tmp_path / f"m{i}.tflite", tmp_path / f"r{i}.json"
        subprocess.run([sys.executable, "-m", "qtoolkit.convert", f"--model={files}/model.keras",
                        f"--output={out}", f"--calibration_data={files}/calib.npy", f"--report={report}",
                        "--range_method=entropy"], check=True, capture_output=True, cwd=ROOT, timeout=300)
        data = json.loads(report.read_text())
        outputs.append((out.read_bytes(), data["comparisons"], data["calibration"]["ranges"]))
    assert outputs[0] == outputs[1]


def test_size_limit_fails_before_converting(files, monkeypatch):
    monkeypatch.setattr(export, "TFLITE_MAX_BYTES", 10)
    monkeypatch.setattr(export, "fake_quant_to_tflite", lambda *a, **k: pytest.fail("converted anyway"))
    with pytest.raises(export.ExportError, match="over TFLite's 2 GiB flatbuffer limit"):
        ptq(str(files / "model.keras"), str(files / "calib.npy"), "int8", progress=False)


def test_npy_calibration_streams_from_disk(tmp_path):
    x = np.random.default_rng(0).normal(size=(1000, 8, 8, 1)).astype(np.float32)
    np.save(tmp_path / "c.npy", x)
    src = calibrate.open_source(str(tmp_path / "c.npy"), [("x", (None, 8, 8, 1), np.float32)])
    assert not isinstance(src.arrays[0], np.ndarray)  # not loaded: read batch by batch
    batches = list(src.take(1000, 100))
    assert len(batches) == 10 and all(isinstance(b[0], np.ndarray) for b in batches)
    np.testing.assert_array_equal(np.concatenate([b[0] for b in batches]), x)
