"""Keras 3 models (`import keras`) on qtoolkit's own path: in memory, .keras and .h5, the CLI; no side effects."""

import functools
import os
import subprocess
import sys

import numpy as np
import pytest
import tf_keras
from absl.testing import flagsaver

import keras  # Keras 3, beside tf_keras in this process
import qtoolkit
from helpers import assert_quantized, tflite_graph
from qtoolkit import convert, verify
from qtoolkit.errors import UnsupportedModelError
from qtoolkit.rewrite import keras3

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
X = np.random.default_rng(0).uniform(0, 1, (240, 12, 12, 3)).astype(np.float32)


def _build(k, seed=0):
    """The same CNN in either Keras (`k` is the keras or the tf_keras package): BN, ReLU6, depthwise, residual."""
    inp = k.Input((12, 12, 3), name="image")
    x = k.layers.Conv2D(8, 3, padding="same", use_bias=False, name="c1")(inp)
    x = k.layers.BatchNormalization(name="bn1")(x)
    x = k.layers.ReLU(6.0, name="r1")(x)
    y = k.layers.DepthwiseConv2D(3, padding="same", name="dw")(x)
    y = k.layers.BatchNormalization(name="bn2")(y)
    y = k.layers.ReLU(name="r2")(y)
    x = k.layers.Add(name="res")([x, y])
    x = k.layers.Conv2D(16, 1, activation="relu", name="pw")(x)
    x = k.layers.GlobalAveragePooling2D(name="gap")(x)
    return k.Model(inp, k.layers.Dense(5, name="logits")(x), name="cnn")


def _keras3_model(seed=0):
    keras.utils.set_random_seed(seed)
    model = _build(keras)
    rng = np.random.default_rng(seed)  # batch norms with statistics of their own, as after training
    for name in ("bn1", "bn2"):
        bn = model.get_layer(name)
        gamma, beta, mean, var = bn.get_weights()
        bn.set_weights([rng.uniform(0.5, 1.5, gamma.shape), rng.normal(0, 0.3, beta.shape),
                        rng.normal(0, 0.3, mean.shape), rng.uniform(0.5, 2.0, var.shape)])
    return model


def test_import_leaves_the_users_tf_keras_alone():
    """In a fresh process without TF_USE_LEGACY_KERAS, importing qtoolkit (and TFMOT behind it) keeps Keras 3."""
    env = {k: v for k, v in os.environ.items() if k != "TF_USE_LEGACY_KERAS"}
    code = ("import os, qtoolkit, qtoolkit.rewrite, tensorflow as tf; "
            "print(tf.keras.Model.__module__, os.environ.get('TF_USE_LEGACY_KERAS'))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    module, variable = proc.stdout.split()[-2:]
    assert module.startswith("keras.") and variable == "None"


def test_twin_has_the_same_layers_weights_and_outputs():
    model = _keras3_model()
    twin = keras3.to_tf_keras(model)
    assert isinstance(twin, tf_keras.Model)
    assert [l.name for l in twin.layers] == [l.name for l in model.layers]
    for a, b in zip(model.layers, twin.layers):
        for wa, wb in zip(a.get_weights(), b.get_weights()):
            np.testing.assert_array_equal(wa, wb)
    np.testing.assert_allclose(twin.predict(X, verbose=0), model.predict(X, verbose=0), atol=1e-5)
    assert model.get_layer("bn1").get_weights()[0].dtype == np.float32  # the user's model is untouched


def test_keras3_model_gives_the_file_of_its_tf_keras_twin():
    """The same weights built with tf_keras and with Keras 3: the same int8 file, the same measurements."""
    model = _keras3_model()
    tf2 = _build(tf_keras)
    tf2.set_weights(model.get_weights())
    r3 = qtoolkit.ptq(model, X, "int8", progress=False)
    r2 = qtoolkit.ptq(tf2, X, "int8", progress=False)
    assert r3.path == r2.path and "fake-quant" in r3.path  # qtoolkit's own path, not the converter's
    assert_quantized(r3)
    (_, ops3, tensors3), (_, ops2, tensors2) = tflite_graph(r3.tflite), tflite_graph(r2.tflite)
    assert [op["op_name"] for op in ops3] == [op["op_name"] for op in ops2]
    for op3, op2 in zip(ops3, ops2):  # every tensor: same dtype, same scale and zero point
        for i3, i2 in zip(list(op3["inputs"]) + list(op3["outputs"]), list(op2["inputs"]) + list(op2["outputs"])):
            if i3 >= 0:
                assert tensors3[i3]["dtype"] == tensors2[i2]["dtype"]
                np.testing.assert_allclose(tensors3[i3]["quantization"][0], tensors2[i2]["quantization"][0],
                                           rtol=1e-5)
                assert tensors3[i3]["quantization"][1] == tensors2[i2]["quantization"][1]
    t3 = verify.LiteRTModel(r3.tflite).predict(X[:60])
    t2 = verify.LiteRTModel(r2.tflite).predict(X[:60])
    step = verify.LiteRTModel(r3.tflite).output_step()
    assert np.max(np.abs(t3 - t2)) <= step + 1e-6
    for key in ("float vs TFLite", "simulated vs TFLite"):
        assert np.isclose(r3.comparisons[key].sqnr_db, r2.comparisons[key].sqnr_db, atol=0.1), key


@pytest.mark.parametrize("suffix", [".keras", pytest.param(".h5", marks=pytest.mark.slow)])
def test_keras3_files_convert_through_the_command_line(tmp_path, capsys, suffix):
    model = _keras3_model()
    path, calib, out = str(tmp_path / f"m{suffix}"), str(tmp_path / "c.npy"), str(tmp_path / "m.tflite")
    model.save(path)
    np.save(calib, X)
    with flagsaver.flagsaver(model=path, calibration_data=calib, output=out):
        assert convert.main(["convert"]) == 0
    text = capsys.readouterr().out
    assert "fake-quant path" in text and "simulated vs TFLite" in text and "no float ops" in text
    assert os.path.getsize(out) > 0


def test_keras3_functional_ops_are_read():
    keras.utils.set_random_seed(1)
    inp = keras.Input((8, 8, 4))
    x = keras.layers.Conv2D(4, 3, padding="same", name="c")(inp)
    x = keras.ops.relu(x * 0.5 + 1.0)
    x = keras.ops.reshape(x, (-1, 256))
    model = keras.Model(inp, keras.layers.Dense(3, name="d")(x))
    x8 = np.random.default_rng(0).uniform(0, 1, (100, 8, 8, 4)).astype(np.float32)
    r = qtoolkit.ptq(model, x8, "int8", progress=False)
    assert_quantized(r, min_sqnr_db=25)


def test_subclassed_keras3_model_is_traced_and_unbuilt_is_one_clear_error():
    class Sub(keras.Model):
        def __init__(self):
            super().__init__()
            self.d = keras.layers.Dense(8, activation="relu")
            self.head = keras.layers.Dense(3)

        def call(self, x):
            return self.head(self.d(x))

    sub = Sub()
    sub(np.zeros((1, 4), np.float32))
    before = [w.copy() for w in sub.get_weights()]
    x = np.random.default_rng(0).normal(size=(80, 4)).astype(np.float32)
    r = qtoolkit.ptq(sub, x, progress=False)
    assert r.inspection.fully_quantized and any("traced" in n for n in r.notes)
    assert r.comparisons["float vs TFLite"].sqnr_db > 15  # a random 4-8-3 network on 64 samples
    assert r.comparisons["simulated vs TFLite"].max_error_steps <= 2
    assert all(np.array_equal(a, b) for a, b in zip(before, sub.get_weights()))
    with pytest.raises(UnsupportedModelError, match="never built or called"):
        qtoolkit.ptq(Sub(), x, progress=False)


def test_non_tensorflow_backend_is_one_clear_error(monkeypatch):
    monkeypatch.setattr(keras.backend, "backend", lambda: "jax")
    with pytest.raises(UnsupportedModelError, match="'jax' backend.*KERAS_BACKEND=tensorflow"):
        keras3.to_tf_keras(_keras3_model())


@pytest.mark.slow  # four Keras applications models, each converted twice
@pytest.mark.parametrize("name", ["MobileNet", "MobileNetV2", "MobileNetV3Small", "EfficientNetB0"])
def test_keras_applications_in_keras3_give_their_tf_keras_twins_file(name):
    """keras.applications (Keras 3: hard_silu, Rescaling, Normalization, squeeze-excite) and tf_keras.applications
    with the same weights: qtoolkit's int8 files compute the same outputs, fully int8."""
    kwargs = dict(weights=None, input_shape=(96, 96, 3), classifier_activation=None, include_top=True)
    if name == "MobileNet":
        kwargs["alpha"] = 0.25
    keras.utils.set_random_seed(0)
    m3 = getattr(keras.applications, name)(**kwargs)
    m2 = getattr(tf_keras.applications, name)(**kwargs)
    m2.set_weights(m3.get_weights())
    x = np.random.default_rng(0).uniform(-1, 1, (80, 96, 96, 3)).astype(np.float32)
    r3, r2 = qtoolkit.ptq(m3, x, "int8", progress=False), qtoolkit.ptq(m2, x, "int8", progress=False)
    assert_quantized(r3)
    assert r3.inspection.ops == r2.inspection.ops
    t3, t2 = verify.LiteRTModel(r3.tflite).predict(x[:40]), verify.LiteRTModel(r2.tflite).predict(x[:40])
    assert np.max(np.abs(t3 - t2)) <= verify.LiteRTModel(r3.tflite).output_step() + 1e-6


@pytest.mark.slow  # the default suite must stay under 3 minutes; each tool's Keras 3 path runs in test_keras3
def test_debugger_and_regression_job_take_keras3_models(tmp_path):
    from qtoolkit import debug, regress

    model = _keras3_model()
    report = debug.analyze(model, X, "int8", num_calibration_samples=160, num_samples=40, tflite=False)
    assert {e.name for e in report.layers} >= {"c1", "dw", "logits"}
    path = tmp_path / "k3.keras"
    model.save(path)
    np.save(tmp_path / "x.npy", X)
    np.save(tmp_path / "y.npy", np.argmax(model.predict(X, verbose=0), 1))  # labels: the float model's answers
    config = tmp_path / "c.yaml"
    config.write_text(f"""
defaults: {{calibration_samples: 160, eval_samples: 80, thresholds: {{min_sqnr: 10}}}}
entries:
  - name: k3
    model: {path}
    data: {{calibration: {tmp_path / 'x.npy'}, inputs: {tmp_path / 'x.npy'}, labels: {tmp_path / 'y.npy'}}}
    schemes: [int8]
""")
    out = tmp_path / "out"
    assert regress.run(str(config), str(out), progress=False, log=None) == 0
    assert "k3/int8" in (out / "report.md").read_text()


@functools.lru_cache(maxsize=2)
def _digits_ptq(version):
    from qtoolkit import datasets, zoo

    (x_train, _), (x_test, y_test) = datasets.load("digits")
    model = zoo.load("mobilenet_v1_digits", version)
    return qtoolkit.ptq(model, x_train[:300], "int8", verification_data=x_test, labels=y_test, progress=False)


@pytest.mark.parametrize("version", [pytest.param("2", marks=pytest.mark.slow), "3"])  # "2": the whole suite
def test_ptq_contract_holds_on_both_keras_versions(version):
    """The same trained reference model built with tf_keras and with Keras 3: fully int8, per-channel, close to
    the simulation, less than a point of accuracy lost, and the same numbers from both."""
    result = _digits_ptq(version)
    # Two steps, not one: this model's simulation is two steps from its file on both Keras versions alike
    # (the 1-step target for every preset is issue 23's).
    assert_quantized(result, min_sqnr_db=25, max_accuracy_drop=1.0, max_gap_steps=2.0 + 1e-3)
    reference = _digits_ptq("2")
    for key in ("float vs TFLite", "simulated vs TFLite"):
        assert result.comparisons[key].candidate_accuracy == reference.comparisons[key].candidate_accuracy
        assert np.isclose(result.comparisons[key].sqnr_db, reference.comparisons[key].sqnr_db, atol=0.05)


KERAS3_LAYER_FILE = '''
import keras

class ChannelScale(keras.layers.Layer):
    def build(self, input_shape):
        self.gamma = self.add_weight(shape=(int(input_shape[-1]),), initializer="ones", name="gamma")

    def call(self, x):
        return x * self.gamma
'''


def test_keras3_custom_layer_file_needs_custom_objects_then_its_call_is_read_as_a_graph(tmp_path):
    import sys

    from qtoolkit import user_code
    from qtoolkit.errors import QtoolkitError

    code = tmp_path / "my_layers.py"
    code.write_text(KERAS3_LAYER_FILE)
    scale = user_code.read(str(code))["ChannelScale"](name="scale")
    inp = keras.Input((8, 8, 1))
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu")(inp)
    model = keras.Model(inp, keras.layers.Dense(4)(keras.layers.GlobalAveragePooling2D()(scale(x))))
    scale.gamma.assign(np.linspace(0.5, 2.0, 8).astype(np.float32))
    path = str(tmp_path / "custom3.keras")
    model.save(path)
    for name in [m for m in sys.modules if m.startswith("qtoolkit_user_code_")]:
        del sys.modules[name]  # as in a fresh process
    x = np.random.default_rng(0).random((60, 8, 8, 1), np.float32)
    with pytest.raises(QtoolkitError, match="class ChannelScale .*--custom_objects"):
        qtoolkit.ptq(path, x, progress=False)
    r = qtoolkit.ptq(path, x, progress=False, custom_objects=str(code))
    assert r.inspection.fully_quantized and r.float_layers == ()
    assert r.comparisons["float vs TFLite"].sqnr_db > 30  # the float column is the Keras 3 model's own output


def test_keras3_transformer_block_is_fully_integer():
    inp = keras.Input((16, 32))
    x = keras.layers.LayerNormalization()(inp)
    x = keras.layers.Add()([inp, keras.layers.MultiHeadAttention(2, 16)(x, x)])
    model = keras.Model(inp, keras.layers.Dense(10)(keras.layers.GlobalAveragePooling1D()(x)))
    x = np.random.default_rng(0).normal(size=(100, 16, 32)).astype(np.float32)
    r = qtoolkit.ptq(model, x, progress=False)
    assert r.inspection.fully_quantized and r.float_layers == ()
    assert r.comparisons["float vs TFLite"].sqnr_db > 25
