"""Quantization-aware training: BN folding with correction, EMA ranges, schedule, export, callback."""

import numpy as np
import pytest
import tensorflow as tf
import tf_keras as keras

import models
import qtoolkit
from helpers import random_inputs, tflite_graph
from qtoolkit import qat, verify
from qtoolkit.callbacks import QuantizationCallback
from qtoolkit.rewrite.qat_layers import QATFoldedConv, QATQuantizeActivation

L = keras.layers


def _conv_bn(kind):
    inp = keras.Input((6, 6, 3))
    if kind == "conv2d":
        x = L.Conv2D(4, 3, use_bias=True, name="c")(inp)
    elif kind == "depthwise":
        x = L.DepthwiseConv2D(3, depth_multiplier=2, name="c")(inp)
    else:
        x = L.Dense(5, name="c")(L.Flatten()(inp))
    out = L.BatchNormalization(name="bn")(x)
    return models._randomize_bn(keras.Model(inp, out))


@pytest.mark.parametrize("kind", ["conv2d", "depthwise", "dense"])
def test_bn_folding_matches_conv_then_bn(kind):
    model = _conv_bn(kind)
    x = random_inputs(model, 16)
    qm = qat.quantize_model(model, "int8")
    layer = [l for l in qm.layers if isinstance(l, QATFoldedConv)][0]
    qat.set_schedule(qm, quant_active=False)
    # Inference (and after the freeze): conv -> BN with moving statistics.
    np.testing.assert_allclose(layer(x if kind != "dense" else x.reshape(16, -1), training=False),
                               model(x, training=False), atol=1e-5)
    # Training, before the freeze: the correction gives BN with batch statistics.
    bn_train = model.get_layer("bn")
    conv_out = model.get_layer("c")(x if kind != "dense" else L.Flatten()(x))
    expected = bn_train(conv_out, training=True)
    got = layer(x if kind != "dense" else x.reshape(16, -1), training=True)
    np.testing.assert_allclose(got, expected, atol=1e-4)
    # Both updated their moving statistics the same way.
    np.testing.assert_allclose(layer.moving_mean.numpy(), bn_train.moving_mean.numpy(), atol=1e-5)
    np.testing.assert_allclose(layer.moving_variance.numpy(), bn_train.moving_variance.numpy(), rtol=1e-4)


def test_naive_folding_quantizes_batch_folded_weights():
    """bn_correction=False (the ablation): same float function in training, but the weights that are
    fake-quantized are folded with the batch sigma, not the moving one that is deployed. Per-channel
    symmetric grids scale with each channel (quant(c*w) = c*quant(w)), so only per-tensor weights differ."""
    model = _conv_bn("depthwise")
    per_tensor_w4 = qtoolkit.load_scheme("w4a8").replace(weights={"granularity": "per_tensor"})
    x = random_inputs(model, 16)
    expected = model.get_layer("bn")(model.get_layer("c")(x), training=True)
    outs = {}
    for correction in (True, False):
        qm = qat.quantize_model(model, per_tensor_w4, bn_correction=correction)
        layer = [l for l in qm.layers if isinstance(l, QATFoldedConv)][0]
        assert layer.bn_correction is correction and layer.get_config()["bn_correction"] is correction
        qat.set_schedule(qm, quant_active=False)
        np.testing.assert_allclose(layer(x, training=True), expected, atol=1e-4)
        qat.set_schedule(qm, quant_active=True)
        outs[correction] = layer(x, training=True).numpy()
    # 4-bit per-tensor weights: the two trainings see different quantized weights.
    assert np.abs(outs[True] - outs[False]).max() > 1e-3


def test_frozen_bn_stops_updating_statistics():
    model = _conv_bn("conv2d")
    qm = qat.quantize_model(model, "int8")
    layer = [l for l in qm.layers if isinstance(l, QATFoldedConv)][0]
    x = random_inputs(model, 8)
    qat.set_schedule(qm, bn_frozen=True)
    before = layer.moving_mean.numpy().copy()
    layer(x, training=True)
    np.testing.assert_array_equal(layer.moving_mean.numpy(), before)


def _int8_weights(data):
    it, ops, tensors = tflite_graph(data)
    out = []
    for op in ops:
        if op["op_name"] in ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED"):
            t = tensors[op["inputs"][1]]
            w = it.get_tensor(t["index"]).astype(np.float32)
            qp = t["quantization_parameters"]
            shape = [1] * w.ndim
            shape[qp["quantized_dimension"]] = -1
            out.append((op["op_name"], w * qp["scales"].reshape(shape)))
    return out


@pytest.mark.parametrize("scheme", ["int8", "w4a8"])
def test_exported_weights_equal_fake_quantized_folded_weights(scheme):
    model = models.conv_bn_relu((8, 8, 1))
    qm = qat.quantize_model(model, scheme)
    data, insp = qat.export_tflite(qm)
    assert insp.fully_quantized and insp.all_weights_per_channel
    inference = qat.to_inference_model(qm)
    folded = [l for l in inference.layers if hasattr(l, "quantized_kernel")]
    exported = _int8_weights(data)
    assert len(folded) == len(exported)
    for layer, (op, w) in zip(folded, exported):
        k = layer.quantized_kernel().numpy()
        k = {"CONV_2D": lambda a: a.transpose(3, 0, 1, 2),
             "DEPTHWISE_CONV_2D": lambda a: a.reshape(1, *a.shape[:2], -1),
             "FULLY_CONNECTED": lambda a: a.T}[op](k)
        if op == "FULLY_CONNECTED" and scheme == "w4a8":
            continue  # re-quantized to 8 bits by the converter (see docs/design.md)
        np.testing.assert_allclose(w, k, rtol=0, atol=1e-6 * np.abs(k).max())
        if scheme == "w4a8":
            per_channel = w.reshape(w.shape[0], -1) if op == "CONV_2D" else w.reshape(-1, w.shape[-1]).T
            assert max(len(np.unique(c)) for c in per_channel) <= 16


def test_mse_weight_range_clips_where_it_helps_and_is_what_is_exported():
    """weight_range="mse": per channel a clipped bound, no larger than max |w|, whose grid has no larger
    squared error; the exported int8 weights are exactly the layer's fake-quantized folded kernel."""
    model = models.conv_bn_relu((8, 8, 1))
    qm = qat.quantize_model(model, "w4a8", weight_range="mse")
    layer = [l for l in qm.layers if isinstance(l, QATFoldedConv)][0]
    kernel = layer.folded()[0]
    flat = kernel.numpy().reshape(-1, layer.units)
    mse = layer.deployed()[0].numpy().reshape(-1, layer.units)
    layer.weight_range = "max"
    top = layer.deployed()[0].numpy().reshape(-1, layer.units)
    assert (np.abs(mse).max(0) <= np.abs(flat).max(0) + 1e-6).all()
    assert (((mse - flat) ** 2).sum(0) <= ((top - flat) ** 2).sum(0) + 1e-9).all()
    layer.weight_range = "mse"
    data, _ = qat.export_tflite(qm)
    (op, w), = [e for e in _int8_weights(data) if e[0] == "CONV_2D"][:1]
    np.testing.assert_allclose(w, mse.reshape(layer.kernel_shape).transpose(3, 0, 1, 2), rtol=0,
                               atol=1e-6 * np.abs(mse).max())
    with pytest.raises(ValueError, match="weight_range"):
        qat.quantize_model(model, "w4a8", weight_range="lsq")


@pytest.mark.slow  # the default suite must stay under 3 minutes on 2 cores; runs in the accuracy-regression workflow
def test_distiller_trains_the_qat_model_and_leaves_the_teacher():
    """Distiller: alpha=1 is the plain loss; the callback drives and exports the student; the teacher's
    weights are neither trained nor part of the trainer."""
    keras.utils.set_random_seed(0)  # the agreement below is of a random network on random labels
    model = models.conv_bn_relu((8, 8, 1))
    x = random_inputs(model, 32)
    y = np.arange(32) % model.output_shape[-1]
    before = [w.copy() for w in model.get_weights()]
    qm = qat.quantize_model(model, "w4a8")
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    plain = qat.Distiller(qm, model, alpha=1.0)
    plain.compile(keras.optimizers.Adam(0.0), loss)
    qm.compile(loss=loss)
    np.testing.assert_allclose(plain.evaluate(x, y, verbose=0), qm.evaluate(x, y, verbose=0), rtol=1e-5)
    trainer = qat.Distiller(qm, model, alpha=0.5, temperature=2.0)
    trainer.compile(keras.optimizers.Adam(1e-3), loss)
    callback = QuantizationCallback(validation_data=(x, y), bn_freeze_step=1)
    trainer.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[callback])
    assert len(trainer.trainable_weights) == len(qm.trainable_weights)
    assert all(np.array_equal(a, b) for a, b in zip(before, model.get_weights()))
    assert all(l.bn_frozen.numpy() for l in qm.layers if isinstance(l, QATFoldedConv) and l.has_bn)
    assert abs(callback.history[-1]["val_int8_accuracy"] - callback.history[-1]["val_qat_accuracy"]) <= 2 / 32


def test_ema_ranges_and_quant_delay():
    model = models.conv_bn_relu((8, 8, 1))
    qm = qat.quantize_model(model, "int8", ema_decay=0.9)
    act = [l for l in qm.layers if isinstance(l, QATQuantizeActivation)][0]  # the input quantizer
    x1 = random_inputs(model, 8, seed=1, low=0, high=1)
    x2 = random_inputs(model, 8, seed=2, low=-2, high=3)
    qat.set_schedule(qm, quant_active=False)  # inside the quantization delay
    y = act(x1, training=True)
    np.testing.assert_array_equal(y, x1)  # not applied...
    assert act.get_range() == pytest.approx((float(x1.min()), float(x1.max())), abs=1e-6)  # ...but learned
    act(x2, training=True)
    assert act.get_range() == pytest.approx((0.9 * float(x1.min()) + 0.1 * float(x2.min()),
                                             0.9 * float(x1.max()) + 0.1 * float(x2.max())), rel=1e-5)
    qat.set_schedule(qm, quant_active=True, ranges_frozen=True)
    frozen = act.get_range()
    y = act(x2, training=True).numpy()
    assert act.get_range() == frozen
    assert len(np.unique(y)) <= 256 and not np.array_equal(y, x2)


@pytest.fixture(scope="module")
def digits():
    model, (x_train, y_train), (x_test, y_test) = models.train_digits(epochs=20)
    return model, (x_train, y_train), (x_test, y_test)


def test_qat_fine_tune_with_callback_matches_deployment(digits, tmp_path):
    model, (x_train, y_train), (x_test, y_test) = digits
    float_acc = float(np.mean(model.predict(x_test, verbose=0).argmax(1) == y_test))
    qm = qtoolkit.quantize_model(model, "int8", calibration_data=x_train[:256])
    qm.compile(keras.optimizers.Adam(1e-4), keras.losses.SparseCategoricalCrossentropy(from_logits=True),
               ["accuracy"])
    best = tmp_path / "best.tflite"
    cb = QuantizationCallback(validation_data=(x_test, y_test), quant_delay=5, bn_freeze_step=25,
                              best_path=str(best))
    stop = keras.callbacks.EarlyStopping(monitor="val_int8_accuracy", mode="max", patience=5)
    history = qm.fit(x_train[:640], y_train[:640], batch_size=32, epochs=2, verbose=0, callbacks=[cb, stop])
    assert "val_int8_accuracy" in history.history and len(history.history["val_int8_accuracy"]) == 2
    last = cb.history[-1]
    # The simulation is the deployment: int8 and Keras QAT accuracy agree within one digit (0.28 points).
    assert abs(last["val_int8_accuracy"] - last["val_qat_accuracy"]) <= 1 / len(y_test) + 1e-9
    assert last["val_int8_sim_gap"] <= 1.0 + 1e-3
    assert last["val_int8_accuracy"] >= float_acc - 0.01
    assert best.exists() and cb.best == max(h["val_int8_accuracy"] for h in cb.history)
    data, insp = qtoolkit.export_tflite(qm, str(tmp_path / "m.tflite"))
    assert insp.fully_quantized and insp.all_weights_per_channel


def test_qat_model_saves_and_loads(tmp_path):
    qm = qat.quantize_model(models.conv_bn_relu((8, 8, 1)), "int8")
    x = random_inputs(qm, 4)
    qm(x, training=True)
    path = str(tmp_path / "qat.keras")
    qm.save(path)
    loaded = keras.models.load_model(path, custom_objects=qtoolkit.custom_objects())
    np.testing.assert_allclose(loaded.predict(x, verbose=0), qm.predict(x, verbose=0), atol=1e-6)


@pytest.mark.slow  # a QAT training of the coverage model
def test_nested_model_and_standalone_bn_train_and_export():
    model = models.coverage()
    qm = qat.quantize_model(model, "int8")
    qm.compile("adam", keras.losses.SparseCategoricalCrossentropy())
    x = random_inputs(model, 32)
    qm.fit(x, np.zeros(32, np.int64), epochs=1, verbose=0)
    data, insp = qat.export_tflite(qm)
    assert insp.fully_quantized and insp.all_weights_per_channel
    gap = verify.compare(qm.predict(x, verbose=0), verify.LiteRTModel(data).predict(x),
                         output_step=verify.LiteRTModel(data).output_step())
    assert gap.max_error_steps <= 2.5


def test_dropout_regularizes_qat_training_and_vanishes_at_export():
    inp = keras.Input((8, 8, 3))
    x = L.ReLU()(L.BatchNormalization()(L.Conv2D(8, 3)(inp)))
    x = L.Dropout(0.5, name="drop")(L.GlobalAveragePooling2D()(x))
    model = keras.Model(inp, L.Dense(4)(x))
    qm = qat.quantize_model(model, "int8")
    assert any(isinstance(layer, L.Dropout) for layer in qm.layers)
    x = np.random.default_rng(0).uniform(0, 1, (16, 8, 8, 3)).astype(np.float32)
    a, b = qm(x, training=True).numpy(), qm(x, training=True).numpy()
    assert not np.allclose(a, b)  # dropout active while training
    np.testing.assert_array_equal(qm(x, training=False).numpy(), qm(x, training=False).numpy())
    data, insp = qat.export_tflite(qm)
    assert insp.fully_quantized
    gap = verify.compare(qm.predict(x, verbose=0), verify.LiteRTModel(data).predict(x),
                         output_step=verify.LiteRTModel(data).output_step())
    assert gap.max_error_steps <= 1.5


@pytest.mark.slow  # a separate TensorFlow process with two logical devices
def test_mirrored_strategy_gives_single_device_ranges():
    """Two logical CPUs (a fresh process: devices are fixed at TensorFlow start-up)."""
    import json
    import os
    import subprocess
    import sys

    script = os.path.join(os.path.dirname(__file__), "scripts", "distributed_qat.py")
    proc = subprocess.run([sys.executable, script], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["range_diff"] < 1e-5 and result["stats_diff"] < 1e-5


def test_qat_never_changes_the_users_model():
    """A layer without a qtoolkit rewrite (Conv2DTranspose) would be reused by the QAT model and trained."""
    inp = keras.Input((8, 8, 3))
    x = L.Conv2D(8, 3, padding="same", activation="relu", name="c1")(inp)
    x = L.Conv2DTranspose(4, 3, strides=2, padding="same", name="up")(x)
    model = keras.Model(inp, L.Dense(3, name="fc")(L.GlobalAveragePooling2D()(x)))
    before = [w.copy() for w in model.get_weights()]
    qm = qat.quantize_model(model, "int8")
    assert not any(layer is original for layer in qm.layers for original in model.layers)
    qm.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    qm.fit(random_inputs(model, 32), np.zeros(32, np.int64), epochs=1, verbose=0)
    assert all(np.array_equal(a, b) for a, b in zip(before, model.get_weights()))
