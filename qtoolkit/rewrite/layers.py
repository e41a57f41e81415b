"""Keras layers the rewriter builds: fake-quant quantizers and folded ops.

    q = RangeQuantizer(bits=8, symmetric=False, narrow_range=False)
    layer = QuantizeActivation(q, name="conv1/act_quant")   # y = fake_quant(x)
    conv = FoldedConv(kind="conv2d", kernel=k, bias=b, activation="relu6",
                      weight_quantizer=RangeQuantizer(8, True, True, per_channel=True),
                      strides=(1, 1), padding="same")

`RangeQuantizer` implements TFMOT's `Quantizer` interface (build / __call__ /
get_config), so it also plugs into TFMOT's `QuantizeConfig` and
`QuantizeWrapperV2`; its ranges are non-trainable variables that calibration
(or, for QAT, an EMA) sets.  `FoldedConv` is what TFMOT lacks: one layer for
Conv2D / DepthwiseConv2D / Dense with a batch norm folded in and its
activation fused, whose kernel is fake-quantized per output channel (for
depthwise kernels over in*multiplier, as TFLite stores them).

All layers serialize through get_config/from_config;
`qtoolkit.rewrite.custom_objects()` is the scope to load a saved quantized
model.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf
import tf_keras as keras

from qtoolkit import _env
from qtoolkit import quantizers as q
from qtoolkit.rewrite.ops import FUSABLE_ACTIVATIONS

tfmot_quantizers = _env.import_tfmot_quantizers()  # leaves the user's tf.keras as it was


class RangeQuantizer(tfmot_quantizers.Quantizer):
    """Fake quantization with a stored range (TFMOT `Quantizer` interface).

    Args:
      bits: 2 to 16.
      symmetric: the range is [-a, a] (set by whoever assigns the range).
      narrow_range: drop the lowest code.
      per_channel: one range per channel along the last axis.
      channels: number of channels when per_channel.
      enabled: when False the quantizer is the identity (float).
    """

    def __init__(self, bits=8, symmetric=False, narrow_range=False, per_channel=False, channels=None,
                 enabled=True):
        q.check_bits(bits)
        self.bits, self.symmetric, self.narrow_range = bits, symmetric, narrow_range
        self.per_channel, self.channels, self.enabled = per_channel, channels, enabled

    def build(self, tensor_shape, name, layer):
        shape = (self.channels,) if self.per_channel else ()
        # ONLY_FIRST_REPLICA: under tf.distribute, QAT computes the same range on
        # every replica (from the all-gathered batch min/max) and writes it once.
        agg = tf.VariableAggregation.ONLY_FIRST_REPLICA
        lo = layer.add_weight(f"{name}_min", shape=shape, initializer=keras.initializers.Constant(-6.0),
                              trainable=False, aggregation=agg)
        hi = layer.add_weight(f"{name}_max", shape=shape, initializer=keras.initializers.Constant(6.0),
                              trainable=False, aggregation=agg)
        return {"min": lo, "max": hi}

    def __call__(self, inputs, training, weights, **kwargs):
        if not self.enabled:
            return inputs
        return q.tf_fake_quant(inputs, weights["min"], weights["max"], self.bits, self.narrow_range,
                               axis=-1 if self.per_channel else None)

    def assign_range(self, weights, lo, hi) -> None:
        """Sets the range (made quantizable: includes 0, symmetric if asked)."""
        lo, hi = q.sanitize_range(lo, hi, self.symmetric)
        weights["min"].assign(np.broadcast_to(lo, weights["min"].shape))
        weights["max"].assign(np.broadcast_to(hi, weights["max"].shape))

    def get_config(self):
        return {"bits": self.bits, "symmetric": self.symmetric, "narrow_range": self.narrow_range,
                "per_channel": self.per_channel, "channels": self.channels, "enabled": self.enabled}

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def __eq__(self, other):
        return isinstance(other, RangeQuantizer) and self.get_config() == other.get_config()

    def __ne__(self, other):
        return not self == other


class QuantizeActivation(keras.layers.Layer):
    """Fake-quantizes a tensor with a calibrated per-tensor range.

    Args:
      quantizer: a RangeQuantizer (per-tensor).
      fixed_range: (min, max) for ops whose output range TFLite fixes
        (softmax, logistic, tanh); calibration leaves it alone.
      range_factor: the range set is the calibrated one times this (get_range
        returns the calibrated one).  A LayerNormalization's mean shares its
        input's range times (1 + 1e-4): its scale is then not the input's
        exactly, so a mean that falls halfway between two codes is not an
        exact tie, which TensorFlow's fake quant (half up) and TFLite's MEAN
        (half away from zero) would round apart (see rewrite/norm.py).
    """

    def __init__(self, quantizer=None, fixed_range=None, range_factor=1.0, **kwargs):
        super().__init__(**kwargs)
        if isinstance(quantizer, dict):
            quantizer = RangeQuantizer.from_config(quantizer)
        self.quantizer = quantizer or RangeQuantizer()
        self.fixed_range = tuple(fixed_range) if fixed_range is not None else None
        self.range_factor = float(range_factor)
        self.clamp_max = None  # set only while exporting activations below 8 bits (export.py)

    def build(self, input_shape):
        self.range = self.quantizer.build(input_shape, "output", self)
        if self.fixed_range is not None:
            self.range["min"].assign(self.fixed_range[0])
            self.range["max"].assign(self.fixed_range[1])
        super().build(input_shape)

    def call(self, inputs, training=None):
        out = self.quantizer(inputs, training, self.range)
        if self.clamp_max is not None:  # b-bit levels in an int8 tensor: the codes above them cut (MINIMUM)
            out = self.quantizer(tf.minimum(out, self.clamp_max), training, self.range)
        return out

    def set_range(self, lo, hi) -> None:
        if self.fixed_range is None:
            lo, hi = q.sanitize_range(lo, hi, self.quantizer.symmetric)
            self.quantizer.assign_range(self.range, lo * self.range_factor, hi * self.range_factor)

    def get_range(self) -> tuple[float, float]:
        lo, hi = float(self.range["min"].numpy()), float(self.range["max"].numpy())
        if self.range_factor == 1.0 or self.fixed_range is not None:
            return lo, hi
        return lo / self.range_factor, hi / self.range_factor

    def get_config(self):
        return {**super().get_config(), "quantizer": self.quantizer.get_config(),
                "fixed_range": self.fixed_range, "range_factor": self.range_factor}


def to_rows(x):
    """(N, T, C) -> (N, 1, T, C): a Conv1D's input as the one-row image CONV_2D reads.

    A constant shape with -1 for the batch is one RESHAPE, which XNNPACK
    takes; tf_keras' Conv1D expands dims (EXPAND_DIMS, left outside XNNPACK)
    and Keras' Reshape computes its shape at run time (SHAPE/STRIDED_SLICE/
    PACK).  An unknown length falls back to expand_dims.
    """
    if x.shape[1] is None or x.shape[2] is None:
        return tf.expand_dims(x, 1)
    return tf.reshape(x, [-1, 1, int(x.shape[1]), int(x.shape[2])])


def from_rows(y):
    """(N, 1, T, C) -> (N, T, C), the inverse of `to_rows`."""
    if y.shape[2] is None or y.shape[3] is None:
        return tf.squeeze(y, 1)
    return tf.reshape(y, [-1, int(y.shape[2]), int(y.shape[3])])


def dense_rows(x):
    """(rows, back): x (N, ..., C) as (N*..., C) rows for a FULLY_CONNECTED, and the map back to (N, ..., units).

    Constant shapes with -1 for the batch (one RESHAPE each, see `to_rows`); an unknown inner size
    falls back to shapes computed at run time.
    """
    inner = [int(d) if d is not None else None for d in x.shape[1:-1]]
    if None in inner or x.shape[-1] is None:
        dynamic = tf.shape(x)[:-1]
        return tf.reshape(x, [-1, tf.shape(x)[-1]]), lambda y: tf.reshape(y, tf.concat([dynamic, [-1]], 0))
    return tf.reshape(x, [-1, int(x.shape[-1])]), lambda y: tf.reshape(y, [-1, *inner, int(y.shape[-1])])


def conv2d_args(kind, kernel_shape, strides, padding, dilation_rate):
    """(strides, padding, dilations) of tf.nn.conv2d for a conv2d or conv1d FoldedConv.

    A conv1d's kernel is (1, k, in, out) over (N, 1, T, C) rows: its stride and
    dilation apply along T; 'causal' pads only the start, by dilation * (k - 1)
    (a PAD before the CONV_2D in TFLite).
    """
    if kind != "conv1d":
        return strides, padding.upper(), dilation_rate
    if padding == "causal":
        pad = [[0, 0], [0, 0], [dilation_rate[0] * (kernel_shape[1] - 1), 0], [0, 0]]
    else:
        pad = padding.upper()
    return (1, *strides), pad, (1, *dilation_rate)


def conv_op(kind, x, kernel, strides, padding, dilation_rate):
    """The linear op of a FoldedConv kind, as Keras computes it."""
    if kind == "conv1d":
        s, p, d = conv2d_args(kind, kernel.shape, strides, padding, dilation_rate)
        return from_rows(tf.nn.conv2d(to_rows(x), kernel, s, p, dilations=d))
    if kind == "conv2d":
        return tf.nn.conv2d(x, kernel, strides, padding.upper(), dilations=dilation_rate)
    if kind == "depthwise":
        return tf.nn.depthwise_conv2d(x, kernel, (1, *strides, 1), padding.upper(), dilations=dilation_rate)
    if x.shape.rank == 2:
        return tf.matmul(x, kernel)
    return tf.tensordot(x, kernel, [[x.shape.rank - 1], [0]])


def activate(y, activation: str):
    """A fused activation: "linear", "relu" or "relu6"."""
    if activation == "relu":
        return tf.nn.relu(y)
    if activation == "relu6":
        return tf.nn.relu6(y)
    return y


class FoldedConv(keras.layers.Layer):
    """Conv2D / Conv1D / DepthwiseConv2D / Dense with folded batch norm and fused activation.

    The kernel is fake-quantized (per output channel or per tensor) before
    the op, exactly as the TFLite kernel will hold it.  A Conv1D ("conv1d")
    holds a (1, k, in, out) kernel and runs as a Conv2D over its (N, 1, T, C)
    rows: one CONV_2D with its activation fused between two RESHAPEs.

    Args:
      kind: "conv2d", "conv1d", "depthwise" or "dense".
      kernel_shape: shape of the (folded) kernel.
      units: output channels.
      activation: "linear", "relu" or "relu6".
      weight_quantizer: RangeQuantizer for the kernel, or None for float.
      strides, padding, dilation_rate: as in Keras (conv kinds only; a
        conv1d's are Conv1D's: (s,), "valid"/"same"/"causal", (d,)).
    """

    def __init__(self, kind, kernel_shape, units, activation="linear", weight_quantizer=None,
                 strides=(1, 1), padding="valid", dilation_rate=(1, 1), **kwargs):
        super().__init__(**kwargs)
        if kind not in ("conv2d", "conv1d", "depthwise", "dense"):
            raise ValueError(f"kind must be conv2d, conv1d, depthwise or dense, got {kind!r}")
        if activation not in FUSABLE_ACTIVATIONS:
            raise ValueError(f"activation must be one of {FUSABLE_ACTIVATIONS}, got {activation!r}")
        if isinstance(weight_quantizer, dict):
            weight_quantizer = RangeQuantizer.from_config(weight_quantizer)
        self.kind, self.kernel_shape, self.units = kind, tuple(kernel_shape), int(units)
        self.activation = activation
        self.weight_quantizer = weight_quantizer
        self.strides, self.padding = tuple(strides), padding
        self.dilation_rate = tuple(dilation_rate)
        # Set by the exporter: the kernel variable already holds quantized values.
        self.snapped = False

    def build(self, input_shape):
        self.kernel = self.add_weight("kernel", shape=self.kernel_shape, trainable=True,
                                      initializer="glorot_uniform")
        self.bias = self.add_weight("bias", shape=(self.units,), trainable=True, initializer="zeros")
        if self.weight_quantizer is not None:
            self.kernel_range = self.weight_quantizer.build(self.kernel_shape, "kernel", self)
        super().build(input_shape)

    def quantized_kernel(self, training=None):
        """The kernel as the op sees it (fake-quantized when a quantizer is set)."""
        k = self.kernel
        if self.weight_quantizer is None or self.snapped:
            return k
        if self.kind == "depthwise":
            flat = tf.reshape(k, (*self.kernel_shape[:2], self.units))
            return tf.reshape(self.weight_quantizer(flat, training, self.kernel_range), self.kernel_shape)
        return self.weight_quantizer(k, training, self.kernel_range)

    def calibrate_weights(self) -> None:
        """Sets the kernel range from the kernel's values (min/max per channel)."""
        if self.weight_quantizer is None:
            return
        k = self.kernel.numpy()
        if self.kind == "depthwise":
            k = q.depthwise_to_channels(k)
        lo, hi = q.channel_range(k, -1 if self.weight_quantizer.per_channel else None)
        self.weight_quantizer.assign_range(self.kernel_range, lo, hi)

    def call(self, inputs, training=None):
        kernel = self.quantized_kernel(training)
        if self.kind == "conv1d":
            # Bias and activation on the rows, so that TFLite fuses them into the CONV_2D;
            # only constant-shape RESHAPEs around it (see to_rows).
            s, p, d = conv2d_args(self.kind, self.kernel_shape, self.strides, self.padding, self.dilation_rate)
            y = tf.nn.conv2d(to_rows(inputs), kernel, s, p, dilations=d)
            return from_rows(activate(tf.nn.bias_add(y, self.bias), self.activation))
        if self.kind == "dense" and inputs.shape.rank > 2:
            # A Dense on tokens (N, T, C): one FULLY_CONNECTED over (N*T, C) rows with its bias and
            # activation fused, between constant-shape RESHAPEs (a tensordot leaves the bias ADD after
            # a RESHAPE, in float: it has no quantizer of its own).
            rows, back = dense_rows(inputs)
            y = activate(tf.nn.bias_add(tf.matmul(rows, kernel), self.bias), self.activation)
            return back(y)
        y = conv_op(self.kind, inputs, kernel, self.strides, self.padding, self.dilation_rate)
        return activate(tf.nn.bias_add(y, self.bias), self.activation)

    def get_config(self):
        return {**super().get_config(), "kind": self.kind, "kernel_shape": self.kernel_shape,
                "units": self.units, "activation": self.activation,
                "weight_quantizer": None if self.weight_quantizer is None else self.weight_quantizer.get_config(),
                "strides": self.strides, "padding": self.padding, "dilation_rate": self.dilation_rate}


class ScaleMap(keras.layers.Layer):
    """x * c for a constant map c > 0 (e.g. (1, H, W, 1)), with c stored in int8 exactly when it can be.

    Average pooling with 'same' padding divides each output by its count of
    valid inputs; the rewriter runs it as a depthwise conv followed by this
    layer.  The converter would quantize a bare constant over [0, max c]
    (1.0 becomes 0.997 for 3x3 windows); here c is fake-quantized over
    [0, 255 / k] with the largest k <= 255 / max(c) that makes every k * c an
    integer (3x3 windows: k = 112), so TFLite stores it exactly.

    Args:
      values: the constant (broadcastable against the input).
      quantize: fake-quantize c (in the model the converter reads).
    """

    def __init__(self, values, quantize=True, **kwargs):
        super().__init__(**kwargs)
        self.values = np.asarray(values, np.float32)
        self.quantize = bool(quantize)
        self.levels = exact_levels(self.values)

    def call(self, inputs):
        c = tf.constant(self.values)
        if self.quantize:
            c = tf.quantization.fake_quant_with_min_max_args(c, 0.0, 255.0 / self.levels, num_bits=8)
        return inputs * c

    def get_config(self):
        return {**super().get_config(), "values": self.values.tolist(), "quantize": self.quantize}


def exact_levels(values: np.ndarray) -> int:
    """The largest k <= 255 / max(values) with every k * value an integer (else that bound)."""
    top = int(np.floor(255.0 / float(np.max(values)) + 1e-9))
    for k in range(top, max(top // 2, 1) - 1, -1):
        scaled = values * k
        if np.allclose(scaled, np.round(scaled), rtol=0, atol=1e-4):
            return k
    return top

