"""XNNPACK delegation report, the rewrites that keep int8 models inside XNNPACK, and the guard."""

import os

import numpy as np
import pytest
import tensorflow as tf
import tf_keras as keras

from helpers import tflite_graph
from qtoolkit import convert, export, runtime, schemes
from qtoolkit.pipeline import ptq
from qtoolkit.rewrite import rewrite

L = keras.layers


def _float_bytes(model):
    return export.float_tflite(model)


def _with_cumsum(chain=1):
    inp = keras.Input((8, 8, 3), batch_size=1)
    x = L.Conv2D(4, 3)(inp)
    for _ in range(chain):
        x = tf.math.cumsum(x, axis=1)  # no XNNPACK kernel: runs in the built-in kernels
    x = L.Conv2D(4, 3)(x)
    return keras.Model(inp, x)


def test_delegation_counts_partitions_around_a_non_delegated_op():
    d = runtime.delegation(_float_bytes(_with_cumsum()))
    assert d.partitions == 2 and [op for op, _ in d.outside] == ["CUMSUM"] and d.ops == 3
    assert not d.fully_delegated
    d = runtime.delegation(_float_bytes(_with_cumsum(chain=2)))
    assert d.partitions == 2 and [op for op, _ in d.outside] == ["CUMSUM", "CUMSUM"]


def test_delegation_of_a_fully_delegated_model():
    inp = keras.Input((8, 8, 3))
    model = keras.Model(inp, L.Conv2D(4, 3, activation="relu")(L.Conv2D(4, 3)(inp)))
    d = runtime.delegation(_float_bytes(model))
    assert d.partitions == 1 and d.outside == [] and d.fully_delegated


def _hard_swish_model(tiny=True):
    """MobileNetV3's hard swish and squeeze-excite (Keras' own formulation), after a conv with tiny outputs."""
    inp = keras.Input((12, 12, 8))
    conv = L.Conv2D(8, 1, name="conv")
    x = conv(inp)
    hs = L.Multiply()([x, L.ReLU(6.0)(x + 3.0) * (1.0 / 6.0)])
    se = L.GlobalAveragePooling2D()(hs)
    se = L.Reshape((1, 1, 8))(se)
    se = L.Conv2D(8, 1)(se)
    se = L.ReLU(6.0)(se + 3.0) * (1.0 / 6.0)
    out = L.Multiply()([hs, se])
    model = keras.Model(inp, out)
    if tiny:  # activations around 1e-4: the ADD of 3 has an input/output scale ratio XNNPACK refuses
        conv.set_weights([conv.get_weights()[0] * 1e-4, conv.get_weights()[1]])
    return model


def test_rewrites_preserve_the_float_function():
    model = _hard_swish_model(tiny=False)
    result = rewrite(model, schemes.load("int8"))
    x = np.random.default_rng(0).uniform(-8, 8, (16, 12, 12, 8)).astype(np.float32)
    np.testing.assert_allclose(result.float_model(x)[0].numpy(), model(x).numpy(), rtol=1e-5, atol=1e-5)
    kinds = [type(layer).__name__ for layer in result.model.layers]
    assert "Reshape" not in kinds and "TFOpLambda" in kinds  # Reshape became tf.reshape with a constant shape
    assert not any(getattr(layer, "symbol", "") == "__operators__.add" for layer in result.model.layers)


@pytest.mark.slow  # the default suite stays under 3 minutes on 2 cores (accuracy-regression workflow runs it)
def test_hard_swish_and_reshape_int8_is_one_xnnpack_partition():
    model = _hard_swish_model(tiny=True)
    x = np.random.default_rng(1).uniform(-1, 1, (120, 12, 12, 8)).astype(np.float32)
    result = ptq(model, x[:100], "int8", verification_data=x[100:], progress=False)
    d = runtime.delegation(result.tflite)
    assert d.partitions == 1 and d.outside == [], d.summary()
    assert "SHAPE" not in result.inspection.ops and "HARD_SWISH" not in result.inspection.ops
    assert result.comparisons["float vs TFLite"].sqnr_db > 25
    # The converter's own PTQ of the same model: HARD_SWISH and the run-time shape stay outside.
    theirs = export.converter_ptq_tflite(model, lambda: ([x[i:i + 1]] for i in range(50)))
    assert runtime.delegation(theirs).partitions > 1


def test_report_problems_and_latency():
    slow = _float_bytes(_with_cumsum())
    rt = runtime.report(slow, slow, benchmark=True, threads=(1,), runs=10)
    assert rt.latency_ms["float"][1] > 0 and rt.speedup(1) > 0
    problems = rt.problems()
    assert problems and "CUMSUM" in problems[0]
    assert "1 thread(s)" in rt.summary() and rt.to_dict()["quantized"]["partitions"] == 2


def test_convert_warns_and_strict_fails_on_ops_outside_the_delegate(tmp_path):
    inp = keras.Input((8, 8, 3))
    x = L.Conv2D(4, 3)(inp)
    model = keras.Model(inp, L.Activation("gelu")(x))  # int8 GELU: no XNNPACK kernel
    path = str(tmp_path / "m.keras")
    model.save(path)
    np.save(tmp_path / "cal.npy", np.random.default_rng(0).uniform(-1, 1, (60, 8, 8, 3)).astype(np.float32))
    out = tmp_path / "m.tflite"
    with open(tmp_path / "log.txt", "w") as log:
        convert.run(path, str(out), str(tmp_path / "cal.npy"), report=str(tmp_path / "r.json"), out=log)
    text = (tmp_path / "log.txt").read_text()
    assert "warning: the quantized model leaves" in text and "GELU" in text
    assert out.exists() and '"runtime"' in (tmp_path / "r.json").read_text()
    os.remove(out)
    with pytest.raises(runtime.RuntimeGuardError, match="GELU"):
        convert.run(path, str(out), str(tmp_path / "cal.npy"), strict=True, out=open(os.devnull, "w"))
    assert not out.exists()


def test_consecutive_affine_layers_become_one_depthwise_conv():
    inp = keras.Input((6, 6, 8))  # more channels than an image: a 1x1 depthwise conv, not MUL + ADD
    x = L.Rescaling(1 / 255.0)(inp)
    norm = L.Normalization(mean=np.linspace(0.4, 0.6, 8), variance=np.linspace(0.05, 0.07, 8))
    x = L.Conv2D(4, 3, padding="same")(norm(x))  # offset + same padding: not folded into the conv
    model = keras.Model(inp, x)
    result = rewrite(model, schemes.load("int8"))
    x = np.random.default_rng(0).uniform(0, 255, (8, 6, 6, 8)).astype(np.float32)
    np.testing.assert_allclose(result.float_model(x)[0].numpy(), model(x).numpy(), rtol=1e-4, atol=1e-4)
    convs = [layer for layer in result.model.layers if getattr(layer, "kind", None) == "depthwise"]
    assert len(convs) == 1 and any("+" in f and "normalization" in f for f in result.folded)


@pytest.mark.parametrize("offset, padding", [(0.0, "zeropad"), (-1.0, "valid")])
def test_affine_before_a_conv_is_folded_into_it(offset, padding):
    inp = keras.Input((9, 9, 3))
    x = L.Rescaling(1 / 127.5, offset=offset)(inp)
    if padding == "zeropad":
        x = L.ZeroPadding2D(1)(x)
    x = L.Conv2D(4, 3, strides=2, padding="valid")(x)
    x = L.DepthwiseConv2D(3)(x)
    model = keras.Model(inp, x)
    result = rewrite(model, schemes.load("int8"))
    x = np.random.default_rng(0).uniform(0, 255, (8, 9, 9, 3)).astype(np.float32)
    np.testing.assert_allclose(result.float_model(x)[0].numpy(), model(x).numpy(), rtol=1e-4, atol=1e-4)
    assert not [layer for layer in result.model.layers if getattr(layer, "kind", None) == "depthwise"
                and layer.name.startswith("rescaling")]
    assert sum(" into " in f for f in result.folded) == 1


def test_affine_before_a_same_padded_conv_with_offset_stays_a_depthwise_conv():
    inp = keras.Input((9, 9, 3))
    model = keras.Model(inp, L.Conv2D(4, 3, padding="same")(L.Rescaling(1 / 127.5, offset=-1.0)(inp)))
    result = rewrite(model, schemes.load("int8"))
    x = np.random.default_rng(0).uniform(0, 255, (4, 9, 9, 3)).astype(np.float32)
    np.testing.assert_allclose(result.float_model(x)[0].numpy(), model(x).numpy(), rtol=1e-4, atol=1e-4)
    assert not any(" into " in f for f in result.folded)


@pytest.mark.parametrize("per_channel", [False, True])
def test_image_preprocessing_runs_as_int8_mul_and_add(per_channel):
    # Before a 'same'-padded conv it cannot be folded; over 3 channels a 1x1 depthwise conv is slow in XNNPACK.
    inp = keras.Input((16, 16, 3))
    x = L.Rescaling(1 / 127.5, offset=-1.0)(inp)
    if per_channel:
        x = L.Normalization(mean=[0.1, -0.1, 0.0], variance=[0.8, 0.9, 1.1])(x)
    model = keras.Model(inp, L.Conv2D(8, 3, 2, padding="same")(x))
    data = np.random.default_rng(0).uniform(0, 255, (120, 16, 16, 3)).astype(np.float32)
    rewritten = rewrite(model, schemes.load("int8"))
    np.testing.assert_allclose(rewritten.float_model(data[:8])[0].numpy(), model(data[:8]).numpy(),
                               rtol=1e-4, atol=1e-4)
    result = ptq(model, data[:100], "int8", verification_data=data[100:], progress=False)
    assert result.inspection.fully_quantized and runtime.delegation(result.tflite).fully_delegated
    assert {"MUL", "ADD"} <= set(result.inspection.ops) and "DEPTHWISE_CONV_2D" not in result.inspection.ops
    assert result.comparisons["float vs TFLite"].sqnr_db > 30
    assert result.comparisons["simulated vs TFLite"].sqnr_db > 30


def _avgpool_model(size, samples, in_channels=4, strides=1, padding="same"):
    """conv 1x1 -> 3x3 average pooling -> conv 1x1 on size x size (or (h, w)) maps, and uniform data for it."""
    h, w = (size, size) if isinstance(size, int) else size
    keras.utils.set_random_seed(0)  # the same weights whatever ran before
    inp = keras.Input((h, w, in_channels))
    x = L.AveragePooling2D(3, strides=strides, padding=padding)(L.Conv2D(8, 1)(inp))
    model = keras.Model(inp, L.Conv2D(4, 1)(x))
    return model, np.random.default_rng(0).uniform(-1, 1, (samples, h, w, in_channels)).astype(np.float32)


@pytest.mark.parametrize("padding", ["same", "valid"])
def test_average_pooling_runs_as_a_delegated_depthwise_conv(padding):
    model, data = _avgpool_model(9, 120, strides=1 if padding == "same" else 2, padding=padding)
    rewritten = rewrite(model, schemes.load("int8"))
    np.testing.assert_allclose(rewritten.float_model(data[:8])[0].numpy(), model(data[:8]).numpy(),
                               rtol=1e-5, atol=1e-5)
    result = ptq(model, data[:100], "int8", verification_data=data[100:], progress=False)
    assert "AVERAGE_POOL_2D" not in result.inspection.ops
    assert runtime.delegation(result.tflite).fully_delegated
    assert result.comparisons["float vs TFLite"].sqnr_db > 30


def _single_mul(data):
    """(interpreter, the file's one MUL op, tensor details by index)."""
    it, ops, tensors = tflite_graph(data)
    (mul,) = [op for op in ops if op["op_name"] == "MUL"]
    return it, mul, tensors


def test_average_pooling_count_map_is_stored_exactly_in_int8():
    # 3x3 'same' over 11x11 (more positions than SMALL_MAP_POSITIONS): counts 9 / 6 / 4, corrections
    # 1 / 1.5 / 2.25.  The converter would store a bare constant over [0, 2.25] (1.0 -> 0.997, a 0.3% bias
    # on every interior output); qtoolkit stores it exactly.
    from qtoolkit.rewrite.layers import exact_levels

    assert exact_levels(np.array([1.0, 1.5, 2.25])) == 112
    model, data = _avgpool_model(11, 80)
    result = ptq(model, data[:64], "int8", verification_data=data[64:], progress=False)
    it, mul, tensors = _single_mul(result.tflite)
    const = tensors[mul["inputs"][1]]
    scale, zero = const["quantization_parameters"]["scales"][0], const["quantization_parameters"]["zero_points"][0]
    stored = (it.get_tensor(const["index"]).astype(np.float32) - zero) * scale
    counts = tf.nn.conv2d(tf.ones((1, 11, 11, 1)), tf.ones((3, 3, 1, 1)), 1, "SAME").numpy()
    np.testing.assert_allclose(stored, 9.0 / counts, rtol=1e-6)
    assert result.comparisons["float vs TFLite"].sqnr_db > 30


def _mul_io_params(data):
    _, mul, tensors = _single_mul(data)
    return [(float(tensors[i]["quantization_parameters"]["scales"][0]),
             int(tensors[i]["quantization_parameters"]["zero_points"][0])) for i in (mul["inputs"][0], mul["outputs"][0])]


@pytest.mark.slow  # the default suite stays under 3 minutes on 2 cores (accuracy-regression workflow runs it)
def test_average_pooling_window_shares_the_output_range_when_most_counts_are_full():
    # 3x3 'same' over 11x11: 81 of 121 positions have the full count, where the MUL by the count map is 1.
    # The window and the output get one range (their union), so TFLite's MUL is exact there; over 3x40
    # (38 of 120 full) each keeps its own range.
    for size, tied in ((11, True), ((3, 40), False)):
        model, data = _avgpool_model(size, 80)
        rewritten = rewrite(model, schemes.load("int8"))
        assert len(rewritten.tied_points) == int(tied)
        result = ptq(model, data[:64], "int8", verification_data=data[64:], progress=False)
        window, output = _mul_io_params(result.tflite)
        assert (window == output) == tied, (size, window, output)
        assert result.comparisons["float vs TFLite"].sqnr_db > 30


@pytest.mark.parametrize("size", [4, 9])
def test_average_pooling_on_a_small_map_is_one_fully_connected_over_positions(size):
    # 3x3 'same' over 4x4 / 9x9 (InceptionV3's maps at 96x96): each output position is a column of
    # weights 1/count, stored exactly per channel; one rounding, as TFLite's AVERAGE_POOL_2D, no MUL.
    from qtoolkit.rewrite.avgpool import SMALL_MAP_POSITIONS, avgpool_matrix

    assert size * size <= SMALL_MAP_POSITIONS
    model, data = _avgpool_model(size, 80)
    rewritten = rewrite(model, schemes.load("int8"))
    np.testing.assert_allclose(rewritten.float_model(data[:8])[0].numpy(), model(data[:8]).numpy(),
                               rtol=1e-5, atol=1e-5)
    result = ptq(model, data[:64], "int8", verification_data=data[64:], progress=False)
    ops = result.inspection.ops
    assert ops.get("FULLY_CONNECTED") == 1 and "MUL" not in ops and "AVERAGE_POOL_2D" not in ops, ops
    assert runtime.delegation(result.tflite).fully_delegated
    it, graph_ops, tensors = tflite_graph(result.tflite)
    (fc,) = [op for op in graph_ops if op["op_name"] == "FULLY_CONNECTED"]
    weights = tensors[fc["inputs"][1]]
    scales = weights["quantization_parameters"]["scales"]
    stored = it.get_tensor(weights["index"]).astype(np.float32) * scales[:, None]  # (out positions, in positions)
    np.testing.assert_allclose(stored, avgpool_matrix(model.layers[2]).T, rtol=1e-6, atol=1e-9)
    assert result.comparisons["float vs TFLite"].sqnr_db > 30


def test_average_pooling_with_one_count_everywhere_is_a_single_depthwise_conv():
    # 3x3 'same' over 2x2: every window holds the 4 inputs, so the average is one depthwise conv
    # with weights 1/4 (no count map, no extra rounding).
    model, data = _avgpool_model(2, 80, in_channels=8)
    rewritten = rewrite(model, schemes.load("int8"))
    np.testing.assert_allclose(rewritten.float_model(data[:8])[0].numpy(), model(data[:8]).numpy(),
                               rtol=1e-5, atol=1e-5)
    result = ptq(model, data[:64], "int8", verification_data=data[64:], progress=False)
    assert "MUL" not in result.inspection.ops and "AVERAGE_POOL_2D" not in result.inspection.ops
    assert runtime.delegation(result.tflite).fully_delegated
    # 32 elements per sample: the int8 error is the ranges' (26-35 dB over init seeds); the simulation is exact.
    assert result.comparisons["simulated vs TFLite"].sqnr_db > 45
    assert result.comparisons["float vs TFLite"].sqnr_db > 20


def test_global_pooling_over_one_position_is_a_reshape_that_keeps_the_range():
    """InceptionV3's last map at 96x96 is 1x1: its global average pooling is a reshape, not a MEAN
    with its own (clipped) range and a second rounding."""
    keras.utils.set_random_seed(0)
    inp = keras.Input((4, 4, 3))
    x = L.Conv2D(16, 3, strides=2, activation="relu")(inp)  # 1x1 map
    model = keras.Model(inp, L.Dense(5)(L.GlobalAveragePooling2D()(x)))
    data = np.random.default_rng(0).uniform(-1, 1, (140, 4, 4, 3)).astype(np.float32)
    rewritten = rewrite(model, schemes.load("int8"))
    # The float twin's first output is the model's (the quantizers' inputs follow).
    np.testing.assert_allclose(rewritten.float_model.predict(data, verbose=0)[0], model.predict(data, verbose=0),
                               rtol=1e-5, atol=1e-5)
    result = ptq(model, data[:100], "int8", verification_data=data[100:], progress=False)
    assert "MEAN" not in result.inspection.ops and "QUANTIZE" not in result.inspection.ops, result.inspection.ops
    _, ops, tensors = tflite_graph(result.tflite)
    reshapes = [op for op in ops if op["op_name"] == "RESHAPE"]
    assert reshapes, [op["op_name"] for op in ops]
    for op in reshapes:
        assert tensors[op["inputs"][0]]["quantization"] == tensors[op["outputs"][0]]["quantization"]
    assert result.comparisons["float vs TFLite"].sqnr_db > 30


def test_concatenation_inputs_share_its_range_without_requantizing():
    """A max-pooled branch and a nested concatenation feed a concatenation (InceptionV3's blocks):
    their ranges are tied to the concatenation's, so TFLite needs no requantizing QUANTIZE op."""
    keras.utils.set_random_seed(0)
    inp = keras.Input((8, 8, 3))
    x = L.Conv2D(8, 1, activation="relu")(inp)
    pooled = L.MaxPooling2D(3, strides=1, padding="same")(x)
    inner = L.Concatenate()([L.Conv2D(4, 1)(x), L.Conv2D(4, 3, padding="same")(x)])
    out = L.Concatenate()([pooled, inner, L.Conv2D(4, 1, activation="relu")(x)])
    model = keras.Model(inp, L.Conv2D(4, 1)(out))
    data = np.random.default_rng(0).uniform(-1, 1, (140, 8, 8, 3)).astype(np.float32)
    rewritten = rewrite(model, schemes.load("int8"))
    assert len(rewritten.tied_points) >= 5  # 3 + 2 inputs; the outer concatenation links both groups
    result = ptq(model, data[:100], "int8", verification_data=data[100:], progress=False)
    assert "QUANTIZE" not in result.inspection.ops, result.inspection.ops
    assert runtime.delegation(result.tflite).fully_delegated
    _, ops, tensors = tflite_graph(result.tflite)
    for op in ops:
        if op["op_name"] == "CONCATENATION":
            scales = {tensors[i]["quantization"] for i in [*op["inputs"], *op["outputs"]]}
            assert len(scales) == 1, scales
    assert result.comparisons["float vs TFLite"].sqnr_db > 30
