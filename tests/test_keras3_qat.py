"""Quantization-aware training of Keras 3 models: Keras 3's compile/fit/callbacks, export, the user's model intact.

(Its own file: the one long test of the Keras 3 suite, so that pytest-xdist can run it beside test_keras3.py.)
"""

import keras  # Keras 3, beside tf_keras in this process
import numpy as np
import pytest

import qtoolkit


@pytest.mark.slow  # the default suite must stay under 3 minutes on 2 cores; runs in the accuracy-regression workflow
def test_qat_in_keras3_trains_with_keras3_fit_and_the_callback(tmp_path):
    """quantize_model(Keras 3 model) is a Keras 3 model: Keras 3 compile/fit/Adam, the callback's
    val_int8_accuracy seen by Keras 3's EarlyStopping, export fully int8, .keras round trip, user model intact."""
    from qtoolkit import datasets, zoo
    from qtoolkit.callbacks import QuantizationCallback

    (x_train, y_train), (x_test, y_test) = datasets.load("digits")
    model = zoo.load("resnet_digits", "3")  # the committed trained weights, built with Keras 3
    before = [w.copy() for w in model.get_weights()]
    qm = qtoolkit.quantize_model(model, "int8", calibration_data=x_train[:256])
    assert isinstance(qm, keras.Model) and {"QATFoldedConv3", "QATQuantizeActivation3"} <= {
        type(layer).__name__ for layer in qm.layers}
    qm.compile(keras.optimizers.Adam(1e-4), keras.losses.SparseCategoricalCrossentropy(from_logits=True),
               metrics=["accuracy"])
    assert not qm.jit_compile  # "auto" keeps TensorFlow's fake-quant kernels (XLA rounds them otherwise)
    best = tmp_path / "best.tflite"  # the callback's export (each epoch) is the file checked below
    callback = QuantizationCallback(validation_data=(x_test, y_test), bn_freeze_step=10, best_path=str(best))
    stop = keras.callbacks.EarlyStopping(monitor="val_int8_accuracy", mode="max", patience=2)
    checkpoint = keras.callbacks.ModelCheckpoint(str(tmp_path / "ckpt.keras"), monitor="val_int8_accuracy",
                                                 mode="max", save_best_only=True)
    history = qm.fit(x_train[:320], y_train[:320], batch_size=32, epochs=2, verbose=0,
                     callbacks=[callback, stop, checkpoint])
    assert (tmp_path / "ckpt.keras").exists()  # Keras 3 saved the QAT model mid-fit, on the callback's metric
    assert len(history.history["val_int8_accuracy"]) == 2
    last = callback.history[-1]
    assert abs(last["val_int8_accuracy"] - last["val_qat_accuracy"]) <= 1 / len(y_test) + 1e-9
    float_accuracy = float(np.mean(model.predict(x_test, verbose=0).argmax(1) == y_test))
    assert last["val_int8_accuracy"] >= float_accuracy - 0.01
    from qtoolkit import export

    inspection = export.inspect(best.read_bytes())
    assert inspection.fully_quantized and inspection.all_weights_per_channel
    path = str(tmp_path / "qat.keras")
    qm.save(path)
    loaded = keras.saving.load_model(path, custom_objects=qtoolkit.custom_objects())
    np.testing.assert_array_equal(loaded.predict(x_test, verbose=0), qm.predict(x_test, verbose=0))
    assert all(np.array_equal(a, b) for a, b in zip(before, model.get_weights()))
