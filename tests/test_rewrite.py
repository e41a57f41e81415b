"""The rewriter: BN folding, activation fusion, quantizer placement, nested models."""

import logging

import numpy as np
import pytest
import tf_keras as keras

import models
from helpers import TWIN_ATOL, random_inputs
from qtoolkit import rewrite, schemes
from qtoolkit.rewrite import FoldedConv, QuantizeActivation

L = keras.layers
INT8 = schemes.load("int8")


def _layers(model, cls):
    return [layer for layer in model.layers if isinstance(layer, cls)]


@pytest.mark.parametrize("build", [models.conv_bn_relu, models.coverage, models.sequential])
def test_float_twin_matches_original(build):
    model = build()
    result = rewrite.rewrite(model, INT8)
    x = random_inputs(model, 16)
    ref = model.predict(x, verbose=0)
    twin = result.float_model.predict(x, verbose=0)[0]
    np.testing.assert_allclose(twin, ref, atol=TWIN_ATOL, rtol=1e-4)
    assert not any(isinstance(layer, L.BatchNormalization) for layer in result.model.layers)


def test_conv_bn_relu_fused_with_one_quantizer_each():
    model = models.conv_bn_relu()
    result = rewrite.rewrite(model, INT8)
    assert result.folded == ["conv+bn+relu", "dw+dw_bn+dw_relu6"]
    folded = _layers(result.model, FoldedConv)
    assert [f.kind for f in folded] == ["conv2d", "depthwise", "conv2d", "dense"]
    assert [f.activation for f in folded] == ["relu", "relu6", "relu", "linear"]
    # input, 3 fused convs, global average pool, dense output: one quantizer each.
    # The input layer's name is Keras' automatic one ("input_1", "input_2", ... by how many came before).
    assert result.quant_points == [f"{model.layers[0].name}_quant", "conv_quant", "dw_quant", "pw_quant",
                                   "gap_quant", "logits_quant"]
    assert not _layers(result.model, L.ReLU)


def test_depthwise_weights_per_channel_over_in_times_multiplier():
    result = rewrite.rewrite(models.conv_bn_relu(), INT8)
    dw = [f for f in _layers(result.model, FoldedConv) if f.kind == "depthwise"][0]
    assert dw.kernel_shape == (3, 3, 8, 2)
    assert dw.kernel_range["min"].shape == (16,)
    # Each channel's range is that channel's own max |w| (symmetric).
    flat = dw.kernel.numpy().reshape(3, 3, 16)
    np.testing.assert_allclose(dw.kernel_range["max"].numpy(), np.abs(flat).max(axis=(0, 1)), rtol=1e-6)


def test_per_tensor_scheme_has_one_weight_range():
    result = rewrite.rewrite(models.conv_bn_relu(), schemes.load("int8_per_tensor"))
    for f in _layers(result.model, FoldedConv):
        assert f.kernel_range["min"].shape == ()


def test_same_scale_ops_get_no_quantizer_and_fixed_ranges_are_fixed():
    result = rewrite.rewrite(models.coverage(), INT8)
    names = set(result.quant_points) | set(result.fixed_points)
    for op in ("maxpool", "reshape", "upsample", "pad", "dropout"):
        assert not any(n.startswith(op) for n in names), (op, names)
    assert "avgpool_quant" in names  # a depthwise conv for XNNPACK (no int8 average pooling there)
    # Add absorbs the following ReLU: one quantizer after the pair.
    assert "add_quant" in names and "add_relu_quant" not in names
    assert {"concat_quant", "lonely_bn_quant", "swish_conv_preact_quant", "swish_conv_quant"} <= names
    # Softmax and the swish's sigmoid have TFLite's fixed output ranges.
    fixed = {n: result.model.get_layer(n).get_range() for n in result.fixed_points}
    assert set(fixed) == {"swish_conv_sigmoid_quant", "classifier_quant"}
    for lo, hi in fixed.values():
        assert (lo, hi) == (0.0, pytest.approx(255 / 256))


def test_nested_model_is_inlined():
    model = models.coverage()
    assert any(isinstance(layer, keras.Model) for layer in model.layers)
    result = rewrite.rewrite(model, INT8)
    assert not any(isinstance(layer, keras.Model) for layer in result.model.layers)
    assert "inner_block/conv+inner_block/bn+inner_block/relu" in result.folded
    assert result.model.get_layer("inner_block_conv").kind == "conv2d"


def test_unknown_layer_warns_by_name_or_fails_in_strict_mode(caplog):
    model = models.with_custom_layer()
    with caplog.at_level(logging.WARNING, logger="qtoolkit"):
        result = rewrite.rewrite(model, INT8)
    assert result.float_layers == ["scale2"]
    assert "scale2" in caplog.text and "Scale2" in caplog.text
    # Its output feeds a quantized conv, so it gets a range (TFLite quantizes there).
    assert "scale2_quant" in result.quant_points
    with pytest.raises(rewrite.UnquantizableLayersError, match="1 layer.*scale2"):
        rewrite.rewrite(model, INT8, strict=True)


def test_weight_only_scheme_places_no_activation_quantizer():
    result = rewrite.rewrite(models.conv_bn_relu(), schemes.load("weight_only_int8"))
    assert not _layers(result.model, QuantizeActivation)


def test_subclassed_and_keras3_models_are_refused():
    class Sub(keras.Model):
        def call(self, x):
            return x

    with pytest.raises(rewrite.UnsupportedModelError, match="subclassed"):
        rewrite.rewrite(Sub(), INT8)
    with pytest.raises(rewrite.UnsupportedModelError, match="expected a Keras model"):
        rewrite.rewrite(object(), INT8)


def test_quantized_model_saves_and_loads(tmp_path):
    result = rewrite.rewrite(models.conv_bn_relu(), INT8)
    path = str(tmp_path / "q.keras")
    result.model.save(path)
    loaded = keras.models.load_model(path, custom_objects=rewrite.custom_objects())
    x = random_inputs(result.model, 4)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), result.model.predict(x, verbose=0), atol=1e-6)
