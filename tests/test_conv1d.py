"""Conv1D: batch norm folded, ReLU fused, per-channel weights, one CONV_2D between constant-shape RESHAPEs.

tf_keras' Conv1D converts to EXPAND_DIMS + CONV_2D + RESHAPE, and the converter leaves its EXPAND_DIMS
outside XNNPACK (one partition per conv); qtoolkit's rewrite runs it as a Conv2D over (N, 1, T, C) rows
with constant reshapes, so the whole int8 file is one XNNPACK partition.
"""

import numpy as np
import pytest
import tf_keras as keras

import qtoolkit
from helpers import TWIN_ATOL, random_inputs, tflite_graph
from qtoolkit import export, rewrite, runtime, schemes, verify
from qtoolkit.rewrite import FoldedConv

L = keras.layers
INT8 = schemes.load("int8")
# Every op a Conv1D network's int8 file may hold; SHAPE/STRIDED_SLICE/PACK, EXPAND_DIMS and RELU may not.
CONV1D_OPS = {"CONV_2D", "RESHAPE", "PAD", "MEAN", "FULLY_CONNECTED"}


def _set_bn_statistics(model, seed=0):
    """Batch norms with statistics of their own, as after training."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, L.BatchNormalization):
            n = layer.gamma.shape[0]
            layer.set_weights([rng.uniform(0.5, 1.5, n), rng.normal(0, 0.3, n), rng.normal(0, 0.3, n),
                               rng.uniform(0.5, 2.0, n)])
    return model


def _variants(length=32, channels=3):
    """Conv1D in every configuration the rewrite handles, one after the other."""
    keras.utils.set_random_seed(0)
    inp = keras.Input((length, channels), name="sequence")
    x = L.Conv1D(8, 3, padding="same", use_bias=False, name="same_nobias")(inp)
    x = L.BatchNormalization(name="bn1")(x)
    x = L.ReLU(name="relu1")(x)
    x = L.Conv1D(8, 3, strides=2, padding="valid", name="valid_stride2")(x)  # with a bias
    x = L.BatchNormalization(name="bn2")(x)
    x = L.ReLU(6.0, name="relu6")(x)
    x = L.Conv1D(12, 3, padding="causal", dilation_rate=2, name="causal_dilated")(x)
    x = L.BatchNormalization(name="bn3")(x)  # no activation after it
    x = L.Conv1D(12, 5, padding="same", dilation_rate=2, activation="relu", name="dilated_relu")(x)  # no BN
    x = L.Conv1D(16, 1, name="pointwise")(x)
    x = L.ReLU(name="relu5")(x)
    x = L.GlobalAveragePooling1D(name="gap")(x)
    return _set_bn_statistics(keras.Model(inp, L.Dense(4, name="head")(x), name="conv1d_variants"))


def _tflite_sqnr(model, data, x):
    """SQNR (dB) of a TFLite file's outputs against the float model's, on `x`."""
    return verify.sqnr_db(model.predict(x, verbose=0), verify.LiteRTModel(data).predict(x))


def _ops(data):
    """(op names, per-channel: every CONV_2D / FULLY_CONNECTED weight has one scale per output channel)."""
    _, ops, tensors = tflite_graph(data)
    names = [op["op_name"] for op in ops]
    weights = [tensors[op["inputs"][1]] for op in ops if op["op_name"] in ("CONV_2D", "FULLY_CONNECTED")]
    per_channel = all(w["dtype"] == np.int8 and len(w["quantization_parameters"]["scales"]) == w["shape"][0]
                      for w in weights)
    return names, per_channel


def test_variants_fold_and_fuse_into_conv1d_folded_convs():
    model = _variants()
    result = rewrite.rewrite(model, INT8)
    assert result.float_layers == []
    assert result.folded == ["same_nobias+bn1+relu1", "valid_stride2+bn2+relu6", "causal_dilated+bn3",
                             "pointwise+relu5"]
    convs = {f.name: f for f in result.model.layers if isinstance(f, FoldedConv) and f.kind == "conv1d"}
    assert sorted(convs) == ["causal_dilated", "dilated_relu", "pointwise", "same_nobias", "valid_stride2"]
    assert [convs[n].activation for n in ("same_nobias", "valid_stride2", "causal_dilated", "dilated_relu")] == \
        ["relu", "relu6", "linear", "relu"]
    assert convs["same_nobias"].kernel_shape == (1, 3, 3, 8)  # (1, k, in, out): a CONV_2D over rows
    assert convs["valid_stride2"].kernel_range["min"].shape == (8,)  # per output channel
    assert not [layer for layer in result.model.layers if isinstance(layer, (L.ReLU, L.BatchNormalization))]
    x = random_inputs(model, 16)
    np.testing.assert_allclose(result.float_model.predict(x, verbose=0)[0], model.predict(x, verbose=0),
                               atol=TWIN_ATOL, rtol=1e-4)


@pytest.mark.slow  # the default suite must stay under 3 minutes on 2 cores; runs in the accuracy-regression workflow
def test_variants_file_is_one_xnnpack_partition():
    model = _variants()
    x = random_inputs(model, 96, seed=1)
    r = qtoolkit.ptq(model, x, "int8", progress=False)
    ops, per_channel = _ops(r.tflite)
    assert set(ops) <= CONV1D_OPS and ops.count("CONV_2D") == 5 and per_channel, ops
    delegation = runtime.delegation(r.tflite)
    assert delegation.outside == [] and delegation.partitions == 1, delegation
    assert r.comparisons["simulated vs TFLite"].max_error_steps <= 2.0 + 1e-3
    assert r.comparisons["float vs TFLite"].sqnr_db > 30


@pytest.mark.slow  # the default suite must stay under 3 minutes on 2 cores; runs in the accuracy-regression workflow
def test_conv1d_bn_delegates_as_well_as_the_converters_file():
    from qtoolkit.zoo import shapes

    model, task = shapes.trained("conv1d_bn")
    # Both tools calibrate on the same samples and are measured on others (the converter would otherwise
    # see the verification samples that ptq holds out).
    calibration, verification = task.x_train[0][:128], task.x_test[0][:128]
    r = qtoolkit.ptq(model, calibration, "int8", verification_data=verification, progress=False)
    reference = export.converter_ptq_tflite(model, lambda: ([calibration[i:i + 1]] for i in range(128)))
    ours, theirs = runtime.delegation(r.tflite), runtime.delegation(reference)
    assert len(ours.outside) <= len(theirs.outside) and ours.partitions <= theirs.partitions, (ours, theirs)
    assert ours.outside == [] and ours.partitions == 1, ours
    ops, per_channel = _ops(r.tflite)
    assert set(ops) <= CONV1D_OPS and ops.count("CONV_2D") == 3 and per_channel, ops
    reference_sqnr = _tflite_sqnr(model, reference, verification)
    assert r.comparisons["float vs TFLite"].sqnr_db >= reference_sqnr - 0.5
    assert r.comparisons["simulated vs TFLite"].max_error_steps <= 1.0 + 1e-3


@pytest.mark.slow  # the default suite must stay under 3 minutes on 2 cores; runs in the accuracy-regression workflow
def test_keras3_conv1d_gives_the_same_file_layout():
    import keras  # Keras 3: rewritten through its tf_keras twin

    from qtoolkit.zoo import shapes

    model = shapes.conv1d_bn(keras)
    r = qtoolkit.ptq(model, np.random.default_rng(0).normal(size=(48, 64, 4)).astype(np.float32), "int8",
                     progress=False)
    ops, per_channel = _ops(r.tflite)
    assert set(ops) <= CONV1D_OPS and ops.count("CONV_2D") == 3 and per_channel, ops
    assert runtime.delegation(r.tflite).partitions == 1


def test_unknown_length_expands_dims():
    inp = keras.Input((None, 4))
    x = L.Conv1D(8, 3, padding="same", use_bias=False, name="conv")(inp)
    x = L.BatchNormalization(name="bn")(x)
    x = L.ReLU(name="relu")(x)
    model = _set_bn_statistics(keras.Model(inp, L.Dense(2)(L.GlobalAveragePooling1D()(x))))
    result = rewrite.rewrite(model, INT8)
    assert result.folded == ["conv+bn+relu"]
    x = np.random.default_rng(0).normal(size=(4, 20, 4)).astype(np.float32)
    np.testing.assert_allclose(result.float_model.predict(x, verbose=0)[0], model.predict(x, verbose=0),
                               atol=TWIN_ATOL, rtol=1e-4)


@pytest.mark.parametrize("cls", ["Conv1DTranspose", "SeparableConv1D"])
def test_other_1d_convs_are_not_taken_for_conv1d(cls):
    layer = getattr(L, cls)(4, 3)
    layer.build((None, 8, 2))
    from qtoolkit.rewrite import ops

    assert ops.conv_kind(layer) is None
