"""qtoolkit.contained: LiteRT runs in a child process; a native crash is one error line, not a dead process.

The crash cases patch `LiteRTModel.predict` to call os.abort() (the forked child inherits the patch): cheap and
deterministic.  The real crash (an int16x8 transformer block: LiteRT 2.3.0 aborts inside `invoke`) is in -m slow.
`python tests/test_contained.py` prints the measured cost of a contained call.
"""

import gc
import os
import signal
import statistics
import time

import numpy as np
import pytest

from qtoolkit import contained, verify
from qtoolkit.errors import QtoolkitError, RuntimeAbortError


def _two_in_two_out():
    import tf_keras as keras

    image, vector = keras.Input((8, 8, 3)), keras.Input((4,))
    x = keras.layers.Conv2D(4, 3, activation="relu")(image)
    x = keras.layers.GlobalAveragePooling2D()(x)
    y = keras.layers.Dense(4)(vector)
    joined = keras.layers.Concatenate()([x, y])
    return keras.Model([image, vector], [keras.layers.Dense(3)(joined), keras.layers.Dense(2)(y)])


@pytest.fixture(scope="module")
def int8_file():
    return _int8_file()


def _int8_file():
    """(flatbuffer, inputs): a small int8 model with two inputs and two outputs."""
    from qtoolkit import export

    rng = np.random.default_rng(0)
    inputs = [rng.uniform(-1, 1, (40, 8, 8, 3)).astype(np.float32), rng.uniform(-1, 1, (40, 4)).astype(np.float32)]

    def representative():
        for i in range(8):
            yield [a[i:i + 1] for a in inputs]

    return export.converter_ptq_tflite(_two_in_two_out(), representative), inputs


@pytest.fixture
def litert_aborts(monkeypatch):
    monkeypatch.setattr(verify.LiteRTModel, "predict", lambda self, *args, **kwargs: os.abort())


def test_same_outputs_as_in_process(int8_file):
    data, inputs = int8_file
    expected = verify.LiteRTModel(data, batch_size=16).predict(inputs)
    got = contained.predict(data, inputs, batch_size=16)
    assert isinstance(got, list) and len(got) == len(expected) == 2
    for e, g in zip(expected, got):
        assert g.dtype == e.dtype == np.float32 and g.shape == e.shape
        np.testing.assert_array_equal(g, e)
    # A partial last batch, as LiteRTModel runs it.
    for e, g in zip(verify.LiteRTModel(data).predict([a[:37] for a in inputs]),
                    contained.predict(data, [a[:37] for a in inputs])):
        np.testing.assert_array_equal(g, e)


def test_spawned_child_same_outputs(int8_file):
    """The fallback where os.fork is missing: a fresh python importing only LiteRT and NumPy."""
    data, inputs = int8_file
    for e, g in zip(verify.LiteRTModel(data).predict(inputs), contained.predict(data, inputs, method="spawn")):
        np.testing.assert_array_equal(g, e)


def test_python_errors_come_back_as_they_are(int8_file):
    data, inputs = int8_file
    with pytest.raises(ValueError) as in_process:
        verify.LiteRTModel(data).predict(inputs[:1])
    with pytest.raises(ValueError) as in_child:
        contained.predict(data, inputs[:1])
    assert type(in_child.value) is type(in_process.value)
    assert str(in_child.value) == str(in_process.value) == "the model has 2 inputs, got 1 arrays"
    assert not contained.aborts(data, inputs)


def test_abort_is_one_error_line_and_the_process_lives_on(int8_file, litert_aborts):
    data, inputs = int8_file
    with pytest.raises(RuntimeAbortError) as caught:
        contained.predict(data, inputs, what="the int16x8 file")
    assert str(caught.value) == "LiteRT aborted (SIGABRT) while running the int16x8 file"
    assert caught.value.signal_name == "SIGABRT"
    assert isinstance(caught.value, QtoolkitError)  # the CLI prints it as one `error:` line, exit code 1
    assert contained.aborts(data, inputs)


def test_process_still_runs_litert_after_an_abort(int8_file, monkeypatch):
    data, inputs = int8_file
    expected = verify.LiteRTModel(data).predict(inputs)
    with monkeypatch.context() as patch:
        patch.setattr(verify.LiteRTModel, "predict", lambda self, *args, **kwargs: os.abort())
        assert contained.aborts(data, inputs)
    np.testing.assert_array_equal(contained.predict(data, inputs)[0], expected[0])


def test_other_signals_are_named(int8_file, monkeypatch):
    data, inputs = int8_file
    monkeypatch.setattr(verify.LiteRTModel, "predict",
                        lambda self, *args, **kwargs: os.kill(os.getpid(), signal.SIGSEGV))
    with pytest.raises(RuntimeAbortError, match=r"^LiteRT crashed \(SIGSEGV\) while running the TFLite file$"):
        contained.predict(data, inputs)


_child_gc_record = {"path": None, "hooked": False}


def _record_child_gc():
    if _child_gc_record["path"]:
        with open(_child_gc_record["path"], "w") as f:
            f.write(str(gc.isenabled()))


def test_no_garbage_collection_in_the_child(int8_file, tmp_path):
    """The collector is off in the forked child from Python's own after-fork hooks on.

    Those hooks allocate, so they can start a collection; collecting the parent's TensorFlow garbage (a
    conversion leaves some) in the child segfaults it (seen in about 1 run of this file in 7).
    """
    data, inputs = int8_file
    if not _child_gc_record["hooked"]:
        os.register_at_fork(after_in_child=_record_child_gc)  # runs beside Python's own hooks
        _child_gc_record["hooked"] = True
    _child_gc_record["path"] = str(tmp_path / "child_gc")
    try:
        assert gc.isenabled()
        np.testing.assert_array_equal(contained.predict(data, inputs)[0], verify.LiteRTModel(data).predict(inputs)[0])
        assert gc.isenabled()  # in the parent: back on
    finally:
        _child_gc_record["path"] = None
    assert (tmp_path / "child_gc").read_text() == "False"


def test_message_says_whether_the_converters_own_file_aborts(int8_file, litert_aborts):
    data, inputs = int8_file
    with pytest.raises(RuntimeAbortError) as same_file:
        contained.predict_explained(data, inputs, "int16x8")
    assert str(same_file.value) == (
        "LiteRT aborted (SIGABRT) while running the int16x8 file; the file is the TFLite converter's own int16x8 "
        "conversion, so the converter's own file aborts too (not a qtoolkit fault); try another scheme (e.g. int8)")
    with pytest.raises(RuntimeAbortError) as both:
        contained.predict_explained(data, inputs, "int8", converter_file=lambda: data)
    assert str(both.value).startswith("LiteRT aborted (SIGABRT) while running the int8 file; "
                                      "the converter's own int8 file aborts too")
    assert "\n" not in str(both.value)

    def cannot_convert():
        raise ValueError("the converter failed\nsecond line")

    with pytest.raises(RuntimeAbortError, match=r"^LiteRT aborted \(SIGABRT\) while running the int8 file; the "
                       r"converter's own int8 file could not be made or run to compare \(the converter failed\)$"):
        contained.predict_explained(data, inputs, "int8", converter_file=cannot_convert)


def test_message_when_the_converters_own_file_runs():
    error = RuntimeAbortError("LiteRT aborted (SIGABRT) while running the int8 file", "SIGABRT")
    message = str(contained.with_baseline(error, False, "int8"))
    assert message.startswith("LiteRT aborted (SIGABRT) while running the int8 file; "
                              "the converter's own int8 file runs")
    segv = RuntimeAbortError("LiteRT crashed (SIGSEGV) while running the int16x8 file", "SIGSEGV")
    assert str(contained.with_baseline(segv, True, "int16x8")) == (
        "LiteRT crashed (SIGSEGV) while running the int16x8 file; the converter's own int16x8 file crashes too "
        "(not a qtoolkit fault); try another scheme (e.g. int8)")


def measure(data, inputs, repeats=10):
    """(median ms in-process, median ms contained) of LiteRTModel(data).predict(inputs)."""
    def median_ms(run):
        run()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            run()
            times.append(1000 * (time.perf_counter() - t0))
        return statistics.median(times)

    return (median_ms(lambda: verify.LiteRTModel(data).predict(inputs)),
            median_ms(lambda: contained.predict(data, inputs)))


def test_overhead_is_milliseconds(int8_file):
    data, inputs = int8_file
    in_process, in_child = measure(data, inputs)
    print(f"\nLiteRT predict: {in_process:.1f} ms in-process, {in_child:.1f} ms in a forked child")
    # ~10-30 ms measured on the 2-core machine; a spawned python per call would be ~200-400 ms.
    assert in_child - in_process < 150


@pytest.mark.slow
def test_int16x8_transformer_block_abort_is_contained():
    """The issue's case: LiteRT 2.3.0 aborts in `invoke` on the converter's int16x8 transformer block."""
    import tf_keras as keras

    from qtoolkit import export

    layers = keras.layers
    inp = keras.Input((16, 32))
    x = layers.Add()([inp, layers.MultiHeadAttention(2, 16)(*[layers.LayerNormalization()(inp)] * 2)])
    y = layers.Dense(32)(layers.Dense(64, activation="gelu")(layers.LayerNormalization()(x)))
    x = layers.GlobalAveragePooling1D()(layers.Add()([x, y]))
    model = keras.Model(inp, layers.Dense(10)(x))
    samples = np.random.default_rng(0).standard_normal((16, 16, 32)).astype(np.float32)
    data = export.converter_ptq_tflite(model, lambda: ([samples[i:i + 1]] for i in range(16)), int16x8=True)
    if not contained.aborts(data, samples[:2]):
        pytest.skip("this LiteRT runs the int16x8 transformer block (the abort is fixed)")
    with pytest.raises(RuntimeAbortError) as caught:
        contained.predict_explained(data, samples, "int16x8")
    assert str(caught.value).startswith(
        "LiteRT aborted (SIGABRT) while running the int16x8 file; the file is the TFLite converter's own int16x8 "
        "conversion, so the converter's own file aborts too")
    # The int8 conversion of the same block runs (and the process is alive to run it).
    int8 = export.converter_ptq_tflite(model, lambda: ([samples[i:i + 1]] for i in range(16)))
    assert contained.predict(int8, samples).shape == (16, 10)


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    data, inputs = _int8_file()
    in_process, in_child = measure(data, inputs, repeats=30)
    spawned = statistics.median(
        (lambda t0: (contained.predict(data, inputs, method="spawn"), 1000 * (time.perf_counter() - t0))[1])(
            time.perf_counter()) for _ in range(5))
    print(f"LiteRT predict of {inputs[0].shape[0]} samples, median: in-process {in_process:.1f} ms, "
          f"forked child {in_child:.1f} ms, spawned python {spawned:.1f} ms")
