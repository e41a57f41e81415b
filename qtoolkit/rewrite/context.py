"""The state builders share while one model is built, and its helpers.

A `BuildContext` holds the tensors built so far and the activation
quantizers placed so far (names, probes, fixed ranges, ties), and places
new ones: quantizers, folded convs, QAT convs, swish as LOGISTIC+MUL.  The
builders in `build.py` each take one, so none of them needs a closure.

    ctx = BuildContext(flat, steps, fused, scheme, quantize=True, qat=False, ema_decay=0.999)
    y = ctx.quant_point(x, "conv1")      # fake quant on x, named conv1_quant
"""

from __future__ import annotations

import re
from typing import Optional

import numpy as np
import tensorflow as tf
import tf_keras as keras

from qtoolkit.rewrite import graph as g
from qtoolkit.rewrite import ops
from qtoolkit.rewrite.fold import bn_weights, kernel_and_bias
from qtoolkit.rewrite.layers import FoldedConv, QuantizeActivation, RangeQuantizer
from qtoolkit.rewrite.plan import Step
from qtoolkit.rewrite.qat_layers import QATFoldedConv, QATQuantizeActivation
from qtoolkit.schemes import QuantScheme

L = keras.layers


def _safe(name: str) -> str:
    """`name` with the characters Keras refuses in layer names replaced by '_'."""
    return re.sub(r"[^A-Za-z0-9_.\-]", "_", name)


def load_folded(layer, kernel, bias):
    """Sets a FoldedConv's kernel and bias (ranges zeroed) and calibrates its weight ranges."""
    layer.set_weights([kernel, bias] + [np.zeros_like(w.numpy()) for w in layer.weights[2:]])
    layer.calibrate_weights()


class BuildContext:
    """State the builders share while one model is built.

    Attributes:
      flat: the flattened source graph.
      fused: id(step) -> folded (kernel, bias) of each fused step.
      scheme: the quantization scheme; `acts` is its activation part.
      quantize: build the fake-quant model (else the float twin).
      qat: build training layers (with `ema_decay` for activation ranges).
      fixed_8bit: 8-bit activations, where TFLite fixes some output ranges.
      tensors: source tensor id -> the built tensor.
      probes: float twin only: the tensors calibrated quantizers observe.
      names: every quantizer name, in placement order; `fixed` those with a
        fixed range; `ties` the (a, b) pairs calibration gives one range.
      point_of: tensor id -> the calibrated quantizer that sets its range
        (through same-scale ops).
      tie: set by a builder to tie its step's output quantizer to this one.
    """

    def __init__(self, flat: g.Graph, steps: list[Step], fused: dict, scheme: QuantScheme, quantize: bool,
                 qat: bool, ema_decay: float):
        self.flat, self.fused, self.scheme, self.acts = flat, fused, scheme, scheme.activations
        self.quantize, self.qat, self.ema_decay = quantize, qat, ema_decay
        self.fixed_8bit = self.acts is not None and self.acts.bits == 8
        self.tensors: dict[int, object] = {}
        self.probes, self.names, self.fixed, self.ties = [], [], [], []
        self.point_of: dict[int, str] = {}
        self.tie: Optional[str] = None
        self.consumers = flat.consumers()
        self.step_of = {id(s.node): s for s in steps}
        self._used_names: set[str] = set()

    def fresh_name(self, name: str, suffix: str = "") -> str:
        """A layer name not used yet in this model: `name` made safe, plus `suffix`, numbered if taken."""
        name = base = _safe(name) + suffix
        i = 1
        while name in self._used_names:
            name, i = f"{base}_{i}", i + 1
        self._used_names.add(name)
        return name

    def quant_point(self, tensor, name: str, fixed_range: Optional[tuple] = None, range_factor: float = 1.0):
        """Puts an activation quantizer on `tensor` (or records the probe in float mode); `range_factor`:
        see QuantizeActivation."""
        name = self.fresh_name(name, "_quant")
        self.names.append(name)
        if fixed_range is not None:
            self.fixed.append(name)
        if not self.quantize or self.acts is None:
            if fixed_range is None:  # fixed ranges are not calibrated: no probe
                self.probes.append(tensor)
            return tensor
        quantizer = RangeQuantizer(self.acts.bits, self.acts.symmetric, self.acts.narrow_range)
        if self.qat:
            return QATQuantizeActivation(quantizer, fixed_range=fixed_range, ema_decay=self.ema_decay,
                                         learned_range=self.scheme.qat.activation_range == "learned",
                                         name=name)(tensor)
        return QuantizeActivation(quantizer, fixed_range=fixed_range, range_factor=range_factor, name=name)(tensor)

    def _weight_quantizer(self, channels: int) -> RangeQuantizer:
        wq = self.scheme.weights
        return RangeQuantizer(wq.bits, wq.symmetric, wq.narrow_range, per_channel=wq.granularity == "per_channel",
                              channels=channels)

    def folded_conv(self, kind, kernel, bias, act, name, conv_args) -> FoldedConv:
        """A FoldedConv for `kernel` and `bias` (weights fake-quantized in the fake-quant model only)."""
        quantizer = self._weight_quantizer(bias.shape[0]) if self.quantize else None
        return FoldedConv(kind, kernel.shape, bias.shape[0], act, quantizer, name=self.fresh_name(name),
                          **conv_args)

    def qat_conv(self, step: Step, kind, act, conv_args):
        """A QATFoldedConv holding the unfolded kernel and the batch norm's parameters, and its weights by
        variable name."""
        kernel, bias = kernel_and_bias(step.node.layer)
        units = bias.shape[0]
        bns = [a.layer for a in step.absorbed if isinstance(a.layer, L.BatchNormalization)]
        quantizer = self._weight_quantizer(units)
        weights = {"kernel": kernel, "bias": bias}
        kwargs = {}
        if bns:
            weights.update(zip(("gamma", "beta", "moving_mean", "moving_variance"), bn_weights(bns[0])))
            kwargs = {"epsilon": bns[0].epsilon, "momentum": bns[0].momentum}
        new = QATFoldedConv(kind, kernel.shape, units, act, quantizer, has_bn=bool(bns),
                            weight_range=self.scheme.qat.weight_range,
                            name=self.fresh_name(step.node.name), **kwargs, **conv_args)
        return new, weights

    def channel_affine(self, x, scale, offset, name: str, activation: str = "linear"):
        """x * scale + offset per last-axis channel as one 1x1 depthwise FoldedConv (per-channel int8
        weights); a tensor of another rank is reshaped to (N, 1, positions, C) and back with constant
        shapes (one RESHAPE each, which XNNPACK takes)."""
        shape, rank, channels = x.shape, x.shape.rank, scale.shape[0]
        if rank != 4:
            spatial = int(np.prod(shape[1:-1])) if rank > 2 else 1
            x = tf.reshape(x, [-1, 1, spatial, channels], name=self.fresh_name(name, "_to4d"))
        kernel = scale.reshape(1, 1, channels, 1)
        new = self.folded_conv("depthwise", kernel, offset, activation, name,
                               {"strides": (1, 1), "padding": "valid", "dilation_rate": (1, 1)})
        out = new(x)
        load_folded(new, kernel, offset)
        if rank != 4:
            out = tf.reshape(out, [-1, *(int(d) for d in shape[1:])], name=self.fresh_name(name, "_back"))
        return out

    def swish(self, x, name: str):
        """x * sigmoid(x), as TFLite runs it: LOGISTIC (fixed output range) then MUL."""
        sig = L.Activation("sigmoid", name=self.fresh_name(name, "_sigmoid"))(x)
        sig = self.quant_point(sig, name + "_sigmoid", ops.FIXED_RANGE_8BIT["sigmoid"])
        return L.Multiply(name=self.fresh_name(name, "_mul"))([x, sig])

    def input_of(self, step: Step):
        """The built tensor of the step's first input."""
        return self.tensors[step.node.inputs[0]]
