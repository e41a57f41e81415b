"""AdaRound's fast path (issue 23): rows reproduce the layer, the compiled loop is Adam on the paper's
loss as the eager reference computes it, early stopping, and layer inputs from one pass."""

import numpy as np
import pytest
import tensorflow as tf
import tf_keras as keras

import models
from helpers import random_inputs
from qtoolkit import rewrite, schemes
from qtoolkit.algorithms import adaround, rows
from qtoolkit.algorithms.layer_inputs import LayerInputs
from qtoolkit.rewrite.layers import FoldedConv, activate, conv_op

ROWS_ATOL = 1e-5  # float32 sums of a few dozen products, in another order

CASES = [  # kind, input shape, kernel shape, strides, padding, dilation
    ("conv2d", (2, 9, 9, 3), (3, 3, 3, 4), (2, 2), "same", (1, 1)),  # stride 2, 'same' padding split unevenly
    ("conv2d", (2, 9, 9, 3), (3, 3, 3, 4), (1, 1), "valid", (2, 2)),  # dilated
    ("conv2d", (2, 6, 6, 5), (1, 1, 5, 4), (1, 1), "valid", (1, 1)),  # pointwise: rows are the pixels
    ("depthwise", (2, 9, 9, 3), (3, 3, 3, 1), (2, 2), "same", (1, 1)),
    ("depthwise", (2, 7, 7, 3), (3, 3, 3, 2), (1, 1), "same", (1, 1)),  # depth multiplier 2
    ("conv1d", (2, 10, 3), (1, 3, 3, 4), (1,), "causal", (2,)),  # explicit padding of the start
    ("dense", (2, 5, 6), (6, 4), None, None, None),  # on tokens
]


@pytest.mark.parametrize("kind,x_shape,k_shape,strides,padding,dilation", CASES)
def test_rows_reproduce_the_layer(kind, x_shape, k_shape, strides, padding, dilation):
    rng = np.random.default_rng(0)
    x = rng.normal(size=x_shape).astype(np.float32)
    kernel = rng.normal(size=k_shape).astype(np.float32)
    args = {"strides": strides, "padding": padding, "dilation_rate": dilation}
    if kind == "conv1d":
        from qtoolkit.rewrite.layers import conv2d_args, from_rows, to_rows

        s, p, d = conv2d_args(kind, k_shape, strides, padding, dilation)
        y = from_rows(tf.nn.conv2d(tf.pad(to_rows(x), p), kernel, s, "VALID", dilations=d)).numpy()
    else:
        y = conv_op(kind, tf.constant(x), kernel, strides, padding, dilation).numpy()
    for pool in (1 << 30, 400):  # every position; a few positions of each sample
        r, t, per_sample = rows.layer_rows(kind, k_shape, x, y, args, np.random.default_rng(0), pool_bytes=pool)
        out = rows.forward(r, rows.kernel_matrix(kind, kernel), rows.form(kind, k_shape)).numpy()
        np.testing.assert_allclose(out, t.numpy(), atol=ROWS_ATOL)
        assert per_sample * x_shape[0] == y.size // y.shape[-1]
        if pool > 1 << 20:
            assert r.shape[0] == per_sample * x_shape[0]
    np.testing.assert_array_equal(rows.kernel_array(kind, rows.kernel_matrix(kind, kernel), k_shape), kernel)


def _reference(w, b, scale, qmin, qmax, x, y, iterations, warm, reg=0.01, lr=1e-2):
    """The eager loop AdaRound ran before issue 23 (Keras Adam, one step per call), on all samples."""
    w_floor = np.floor(w / scale)
    v = tf.Variable(adaround.init_v(w / scale - w_floor))
    opt = keras.optimizers.Adam(lr)
    for i in range(iterations):
        b_, lam = (20.0, 0.0) if i < warm else (20.0 - 18.0 * (i - warm) / max(1, iterations - warm), reg)
        with tf.GradientTape() as tape:
            h = adaround.rectified_sigmoid(v)
            out = activate(x @ (scale * tf.clip_by_value(w_floor + h, qmin, qmax)) + b, "relu")
            loss = tf.reduce_mean(tf.reduce_sum(tf.square(out - y), -1)) + lam * tf.reduce_sum(
                1.0 - tf.pow(tf.abs(2.0 * h - 1.0), b_))
        opt.apply_gradients([(tape.gradient(loss, v), v)])
    return v.numpy()


def test_compiled_loop_is_the_eager_reference():
    rng = np.random.default_rng(1)
    w, b = rng.normal(size=(5, 3)).astype(np.float32), rng.normal(size=3).astype(np.float32)
    x = rng.normal(size=(40, 5)).astype(np.float32)
    y = np.maximum(x @ w + b, 0)
    scale = (np.abs(w).max(0) / 7).astype(np.float32)
    iterations, warm = 20, 4
    want = _reference(w, b, scale, -7, 7, x, y, iterations, warm)
    w_floor = np.floor(w / scale)
    ran, v = adaround._loop("matmul", "relu", True)(
        x, y, w_floor, np.broadcast_to(scale, w.shape), b, adaround.init_v(w / scale - w_floor),
        -7.0, 7.0, 0.01, 20.0, 2.0, warm, iterations, 40, 0, 1e-2)
    assert int(ran) == iterations
    np.testing.assert_allclose(v.numpy(), want, atol=1e-4)


def test_early_stopping_once_every_weight_is_rounded():
    """A strong regulariser drives every h(V) to exactly 0 or 1 right after the warm-up: the loop stops
    there, and every code is the floor or the ceiling of w / scale."""
    rng = np.random.default_rng(0)
    w, b = rng.normal(size=(8, 4)).astype(np.float32), np.zeros(4, np.float32)
    x = rng.normal(size=(64, 8)).astype(np.float32)
    scale = (np.abs(w).max(0) / 7).astype(np.float32)
    stats = {}
    codes = adaround.round_layer("dense", w, b, scale, -7, 7, x, x @ w, "linear", iterations=2000, reg=100.0,
                                 beta=(2.0, 2.0), stats=stats)
    assert stats["iterations"] < 1000, stats  # measured: 4xx (the warm-up is 400)
    ratio = w / scale
    assert np.all((codes == np.floor(ratio)) | (codes == np.ceil(ratio)))


def test_layer_inputs_match_the_models_own_outputs():
    keras.utils.set_random_seed(0)
    model = models.conv_bn_relu((8, 8, 3))
    rw = rewrite.rewrite(model, schemes.load("int8"))
    x = random_inputs(model, 10)
    layers = [layer for layer in rw.model.layers if isinstance(layer, FoldedConv)]
    wants = keras.Model(rw.model.inputs, [layer.input for layer in layers])(x)
    stepper = LayerInputs(rw.model, [x], chunk=4)
    for layer, want in zip(layers, wants):
        np.testing.assert_allclose(stepper.inputs_of(layer.name)[0].numpy(), want.numpy(), atol=1e-6)


def test_adaround_runs_a_residual_network_with_projection_shortcuts():
    """`model.layers` lists a block's shortcut conv before the conv the graph runs first: AdaRound takes the
    layers in the graph's order (it had stopped with "no layer 'b1_conv2' left to run")."""
    from qtoolkit import calibrate, zoo

    keras.utils.set_random_seed(0)
    model = zoo.resnet_small((8, 8, 1), 3)
    rw = rewrite.rewrite(model, schemes.load("int8"))
    x = random_inputs(model, 16)
    calibrate.calibrate(rw, calibrate.open_source([x], [("image", (None, 8, 8, 1), np.float32)]), 16,
                        schemes.load("int8"), progress=False)
    times = adaround.adaround(rw, [x], iterations=20, progress=False)
    assert {"b1_conv2", "b1_shortcut"} <= set(times)
    for layer in (rw.model.get_layer("b1_conv2"), rw.model.get_layer("b1_shortcut")):
        scale = adaround.grid_of(layer)[0]
        codes = layer.kernel.numpy() / scale
        np.testing.assert_allclose(codes, np.round(codes), atol=1e-3)
