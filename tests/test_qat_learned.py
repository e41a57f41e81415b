"""Learned step sizes in QAT: scheme keys qat.weight_range / qat.activation_range "learned" (docs/qat.md)."""

import numpy as np
import pytest
import tensorflow as tf
import tf_keras as keras

import models
import qtoolkit
from helpers import tflite_graph
from qtoolkit import qat, quantizers as q, schemes, verify
from qtoolkit.rewrite.qat_layers import QATFoldedConv, QATQuantizeActivation


def _lsq_reference(x, dy, lo, hi, steps):
    """LSQ's gradients (with LSQ+'s offset) for x, min and max per last-axis channel, in numpy."""
    s = (hi - lo) / steps
    zero_point = np.clip(np.floor(-lo / s + 0.5), 0, steps)  # TensorFlow's nudge (not narrow range)
    v = (x + zero_point * s) / s
    below, above = v < 0, v > steps
    d_v = np.where(above, steps, np.where(below, 0.0, np.round(v) - v))
    g = 1 / np.sqrt(x.shape[0] * steps)
    d_step = (dy * d_v).sum(0) * g
    d_lo = (dy * (below | above)).sum(0) * g
    return dy * ~(below | above), d_lo - d_step / steps, d_step / steps


def test_learned_fake_quant_is_tensorflows_forward_with_lsq_gradients():
    rng = np.random.RandomState(0)
    x = (rng.randn(400, 3) * [1.0, 2.0, 0.5]).astype(np.float32)
    dy = rng.randn(400, 3).astype(np.float32)
    lo, hi = tf.constant([-1.0, -3.0, 0.0]), tf.constant([1.5, 2.0, 0.7])
    xt = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch([xt, lo, hi])
        y = q.tf_learned_fake_quant(xt, lo, hi, 4, False, per_channel=True)
        loss = tf.reduce_sum(y * dy)
    np.testing.assert_array_equal(y.numpy(), q.tf_fake_quant(xt, lo, hi, 4, False, axis=-1).numpy())
    got = tape.gradient(loss, [xt, lo, hi])
    for g, want in zip(got, _lsq_reference(x, dy, lo.numpy(), hi.numpy(), 15.0)):
        np.testing.assert_allclose(g.numpy(), want, rtol=1e-4, atol=1e-4)


def test_learned_range_narrows_a_range_too_wide_where_tensorflows_gradient_is_silent():
    """Nothing clipped: TensorFlow's fake-quant gradient gives the range nothing; LSQ's rounding-error term
    says that a narrower range lowers the squared error."""
    x = tf.constant(np.random.RandomState(1).uniform(-1, 1, (1000, 1)).astype(np.float32))
    lo, hi = tf.constant(-4.0), tf.constant(4.0)
    grads = {}
    for name, fq in (("tf", q.tf_fake_quant), ("learned", q.tf_learned_fake_quant)):
        with tf.GradientTape() as tape:
            tape.watch([lo, hi])
            loss = tf.reduce_sum(tf.square(fq(x, lo, hi, 3, False) - x))
        grads[name] = [float(g) for g in tape.gradient(loss, [lo, hi])]
    assert grads["tf"] == [0.0, 0.0]
    assert grads["learned"][0] < 0 < grads["learned"][1]  # descent moves min up and max down


def test_scheme_keys_validate_and_round_trip():
    s = qtoolkit.load_scheme("w4a8").replace(qat={"weight_range": "learned", "activation_range": "learned"})
    assert schemes.QuantScheme.from_dict(s.to_dict()) == s and "weight_range: learned" in s.to_yaml()
    assert qtoolkit.load_scheme("int8").qat == schemes.QATOptions("max", "ema")
    with pytest.raises(schemes.SchemeError, match="qat.activation_range must be one of ema, learned"):
        qtoolkit.load_scheme("int8").replace(qat={"activation_range": "lsq"})
    with pytest.raises(schemes.SchemeError, match="unknown key qat.step"):
        qtoolkit.load_scheme("int8").replace(qat={"step": 1})


def _trained(scheme, **options):
    # Seeded: with some random batch norms, training-mode outputs fall outside every calibrated range and no
    # gradient reaches the layers before (true of any fake quant's straight-through gradient).
    keras.utils.set_random_seed(0)
    model = models.conv_bn_relu((8, 8, 1))
    rng = np.random.RandomState(0)
    x = rng.rand(64, 8, 8, 1).astype(np.float32)
    y = model(x, training=False).numpy() + rng.randn(64, 5).astype(np.float32)
    qm = qat.quantize_model(model, scheme, calibration_data=x[:32], **options)
    optimizer = keras.optimizers.Adam(1e-3)
    for batch in (slice(0, 32), slice(32, 64)):  # two training steps, eagerly (no fit to trace)
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(qm(x[batch], training=True) - y[batch]))
        optimizer.apply_gradients(zip(tape.gradient(loss, qm.trainable_weights), qm.trainable_weights))
    return qm, x


def test_learned_ranges_train_and_the_file_is_what_was_trained():
    qm, x = _trained("w4a8", weight_range="learned", activation_range="learned")
    convs = [l for l in qm.layers if isinstance(l, QATFoldedConv)]
    acts = [l for l in qm.layers if isinstance(l, QATQuantizeActivation) and l.fixed_range is None]
    assert all(np.abs(c.weight_log_scale.numpy()).max() > 0 for c in convs)  # trained
    assert all(np.abs(a.range_log_scale.numpy()).max() > 0 for a in acts)
    # A bound above max |w|: the file's grid is the learned one (max |w| of the kernel would be a finer one).
    conv = convs[0]
    conv.weight_log_scale.assign(np.full(conv.units, 0.01, np.float32))  # factor e^0.3
    bound = conv.deployed_bound()
    assert (np.abs(conv.deployed()[0].numpy()).reshape(-1, conv.units).max(0) < bound - 1e-6).any()
    data, inspection = qat.export_tflite(qm)
    assert inspection.fully_quantized and inspection.all_weights_per_channel
    _, ops, tensors = tflite_graph(data)
    first = [op for op in ops if op["op_name"] == "CONV_2D"][0]
    scales = tensors[first["inputs"][1]]["quantization_parameters"]["scales"]
    np.testing.assert_allclose(scales, bound / 7, rtol=1e-5)
    lo, hi = acts[-1].deployed_range()
    gap = np.abs(qm(x, training=False).numpy() - verify.LiteRTModel(data).predict(x)).max() / ((hi - lo) / 255)
    assert gap <= 1.0 + 1e-3


@pytest.mark.slow  # the default suite must stay under 3 minutes on 2 cores; runs in the accuracy-regression workflow
def test_learned_ranges_in_keras3(tmp_path):
    import keras as keras3

    keras3.utils.set_random_seed(0)  # see _trained
    inp = keras3.Input((8, 8, 1))
    y = keras3.layers.Conv2D(4, 3, use_bias=False)(inp)
    y = keras3.layers.ReLU()(keras3.layers.BatchNormalization()(y))
    out = keras3.layers.Dense(3)(keras3.layers.GlobalAveragePooling2D()(y))
    model = keras3.Model(inp, out)
    x = np.random.RandomState(0).rand(64, 8, 8, 1).astype(np.float32)
    scheme = qtoolkit.load_scheme("int8").replace(qat={"weight_range": "learned", "activation_range": "learned"})
    qm = qtoolkit.quantize_model(model, scheme, calibration_data=x[:16])
    assert isinstance(qm, keras3.Model)
    learned = [w for w in qm.trainable_weights if "log_scale" in w.path]
    assert len(learned) == 6  # two weight bounds (conv, dense); four activation ranges (input, conv, pooling, dense)
    qm.compile(keras3.optimizers.Adam(1e-3), "mse")
    qm.fit(x, np.random.RandomState(1).randn(64, 3).astype(np.float32), batch_size=16, epochs=1, verbose=0)
    assert all(np.abs(w.numpy()).max() > 0 for w in learned), [(w.path, w.numpy()) for w in learned]
    data, inspection = qtoolkit.export_tflite(qm)
    assert inspection.fully_quantized
    assert np.abs(qm.predict(x, verbose=0) - verify.LiteRTModel(data).predict(x)).max() < 0.05
    qm.save(tmp_path / "learned.keras")  # the learned factors are saved and loaded with the model
    loaded = keras3.saving.load_model(tmp_path / "learned.keras", custom_objects=qtoolkit.custom_objects())
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), qm.predict(x, verbose=0))
