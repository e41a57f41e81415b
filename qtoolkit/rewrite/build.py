"""Building: the Keras model (fake-quant or float twin) from the planned steps.

This module owns how each step kind becomes Keras layers and where the
activation quantizers go.  `BUILDERS` is the one registry: step kind ->
the function that builds it and where its output's range comes from.  A new
step kind is one builder function and one entry there.

    built = build(flat, steps, fused, scheme, quantize=True, model_name="net")
    built.model, built.names   # the model; its quantizers in placement order

Builders share a `BuildContext` (context.py): the tensors built so far, the
quantizer names placed so far, and the helpers that place quantizers and
folded convs.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple, Optional

import numpy as np
import tensorflow as tf
import tf_keras as keras

from qtoolkit.rewrite import graph as g
from qtoolkit.rewrite import ops
from qtoolkit.rewrite.avgpool import SMALL_MAP_POSITIONS, TIE_FULL_FRACTION, avgpool_correction, avgpool_matrix
from qtoolkit.rewrite.context import BuildContext, load_folded
from qtoolkit.rewrite.fold import affine_params
from qtoolkit.rewrite.attention import build_attention
from qtoolkit.rewrite.layers import ScaleMap
from qtoolkit.rewrite.norm import build_layernorm
from qtoolkit.rewrite.plan import Step
from qtoolkit.rewrite.recurrent import build_recurrent
from qtoolkit.schemes import QuantScheme

L = keras.layers

# Where a step's output range comes from (StepBuilder.output_range).
OWN = "own"          # a quantizer of its own (calibrated, or fixed by TFLite)
INPUT = "input"      # its input's: TFLite's kernel keeps the scale
READERS = "readers"  # none while float; TFLite quantizes it where an int8 op reads it


def _build_layer(ctx: BuildContext, step: Step):
    """The node's own layer, then the layers it absorbed (a ReLU after an Add)."""
    out = g.call(step.node, ctx.tensors)
    for extra in step.absorbed:
        out = extra.layer(out)
    return out


def _build_float(ctx: BuildContext, step: Step):
    """The node's own layer, unquantized."""
    # A float layer's float inputs stay float: dequantized by TFLite.
    return g.call(step.node, ctx.tensors)


def _build_passthrough(ctx: BuildContext, step: Step):
    """Nothing: the step's output is its input (its maths went into another step's weights)."""
    return ctx.input_of(step)


def _build_identity(ctx: BuildContext, step: Step):
    """Nothing at inference; a copy of the regularizing layer when training QAT."""
    node = step.node
    if ctx.qat and ctx.quantize and isinstance(node.layer, ops.IDENTITY):
        # Dropout & co. regularize QAT as they did float training (identity at inference and export).
        layer = node.layer.__class__.from_config({**node.layer.get_config(), "name": ctx.fresh_name(node.name)})
        return layer(ctx.input_of(step))
    return ctx.input_of(step)


def _static_reshape(node: g.Node) -> Optional[list]:
    """[-1, *target] for a Reshape layer whose output shape is known, else None.

    Keras' Reshape builds its shape at run time from the batch size
    (SHAPE/STRIDED_SLICE/PACK before the RESHAPE in TFLite), ops XNNPACK does
    not take: EfficientNet's squeeze-excite blocks split its graph into 17
    partitions.  A constant shape with -1 for the batch is one RESHAPE.
    A global pooling over one position is the same reshape: as a MEAN it
    would get its own output range and requantize (InceptionV3 at 96x96 lost
    0.5 dB there to the range calibrated on the pooled copy).
    """
    if not (isinstance(node.layer, L.Reshape) or ops.pools_one_position(node.layer)) or len(node.inputs) != 1:
        return None
    shape = node.layer.output_shape
    if isinstance(shape, list) or any(d is None for d in shape[1:]):
        return None
    return [-1, *(int(d) for d in shape[1:])]


def _build_same_scale(ctx: BuildContext, step: Step):
    """The node's own layer, or one constant-shape reshape where it is one (see _static_reshape)."""
    shape = _static_reshape(step.node)
    if shape is None:
        return _build_layer(ctx, step)
    return tf.reshape(ctx.input_of(step), shape, name=ctx.fresh_name(step.node.name))


def _build_fused(ctx: BuildContext, step: Step):
    """One FoldedConv (QATFoldedConv in QAT) for a conv/dense with its batch norm and activation."""
    node, layer = step.node, step.node.layer
    kernel, bias = ctx.fused[id(step)]
    kind = ops.conv_kind(layer)
    act = "linear" if step.activation == "?" else step.activation
    conv_args = {} if kind == "dense" else {
        "strides": layer.strides, "padding": layer.padding, "dilation_rate": layer.dilation_rate}
    if ctx.qat and ctx.quantize:
        new, weights = ctx.qat_conv(step, kind, act, conv_args)
        out = g.call(node, ctx.tensors, layer=new)
        for name, value in weights.items():
            getattr(new, name).assign(value)
    else:
        new = ctx.folded_conv(kind, kernel, bias, act, node.name, conv_args)
        out = g.call(node, ctx.tensors, layer=new)
        load_folded(new, kernel, bias)
    if step.activation == "?":
        # Non-fusable activation (e.g. swish): TFLite runs it as its own op.
        out = ctx.quant_point(out, node.name + "_preact")
        act_name = getattr(layer.activation, "__name__", "")
        out = ctx.swish(out, node.name) if act_name in ops.SWISH_ACTIVATIONS and ctx.fixed_8bit else \
            L.Activation(layer.activation, name=ctx.fresh_name(node.name, "_act"))(out)
    return out


def _build_swish(ctx: BuildContext, step: Step):
    """A swish activation layer as LOGISTIC then MUL."""
    return ctx.swish(ctx.input_of(step), step.node.name)


def _build_affine(ctx: BuildContext, step: Step):
    """A per-channel scale and offset as int8 ops: MUL/ADD of constants or a 1x1 depthwise conv."""
    # A batch norm after no conv: a 1x1 depthwise conv (per-channel int8
    # weights), which TFLite runs in int8; other ranks are reshaped to 4-D.
    node = step.node
    scale, offset = step.affine or affine_params(node.layer)
    x = ctx.input_of(step)
    if node.inputs[0] in ctx.flat.inputs and scale.shape[0] <= 4 and step.activation in (None, "linear") \
            and step.fixed_range is None:
        # Preprocessing of a few-channel model input (an image): int8 MUL and ADD of constants,
        # as the converter keeps them. A 1x1 depthwise conv over 3 channels fills 3 of XNNPACK's
        # 16-channel tile: 0.3 ms against 0.02 ms at 224x224x3 (scripts/bench_layers.py).
        uniform = np.allclose(scale, scale[0]) and np.allclose(offset, offset[0])
        a, b = (float(scale[0]), float(offset[0])) if uniform else (scale, offset)
        out = tf.multiply(x, a, name=ctx.fresh_name(node.name, "_mul"))
        out = ctx.quant_point(out, node.name + "_scaled")
        out = tf.add(out, b, name=ctx.fresh_name(node.name, "_add"))
    else:
        out = ctx.channel_affine(x, scale, offset, node.name, step.activation)
    if step.fixed_range is not None and not ctx.quantize:
        # The quantizer's fixed range clips the fake-quant model; the float twin clips explicitly.
        out = L.ReLU(max_value=step.fixed_range[1], name=ctx.fresh_name(node.name, "_clip"))(out)
    return out


def _build_avgpool(ctx: BuildContext, step: Step):
    """An AveragePooling2D as a depthwise conv (or a FULLY_CONNECTED over positions)."""
    # Average pooling = depthwise conv with weights 1/count (exact in int8 per channel).
    # 'same' padding divides each output by its own count of valid inputs: when every
    # position has the same count (small maps, e.g. 3x3 over 2x2) that is the weight;
    # on a small map a FULLY_CONNECTED over positions holds every 1/count; otherwise a
    # MUL by the constant window/count map follows (one more rounding).
    layer = step.node.layer
    correction = avgpool_correction(layer)
    uniform = np.allclose(correction, correction.flat[0], rtol=1e-6, atol=0)
    _, h, w, _ = layer.input_shape
    # Per-channel weights store every column's 1/count exactly (its largest weight).
    if not uniform and h * w <= SMALL_MAP_POSITIONS and ctx.scheme.weights is not None \
            and ctx.scheme.weights.granularity == "per_channel":
        return _avgpool_over_positions(ctx, step)
    channels = int(layer.input_shape[-1])
    weight = (float(correction.flat[0]) if uniform else 1.0) / np.prod(layer.pool_size)
    kernel = np.full((*layer.pool_size, channels, 1), weight, np.float32)
    zeros = np.zeros(channels, np.float32)
    new = ctx.folded_conv("depthwise", kernel, zeros, "linear", step.node.name,
                          {"strides": layer.strides, "padding": layer.padding, "dilation_rate": (1, 1)})
    out = new(ctx.input_of(step))
    load_folded(new, kernel, zeros)
    if not uniform:
        out = ctx.quant_point(out, step.node.name + "_window")
        if np.mean(np.isclose(correction, 1.0)) >= TIE_FULL_FRACTION:
            ctx.tie = ctx.names[-1]
        out = ScaleMap(correction, quantize=ctx.quantize, name=ctx.fresh_name(step.node.name, "_count"))(out)
    return out


def _avgpool_over_positions(ctx: BuildContext, step: Step):
    """An average pooling as one FULLY_CONNECTED over the map's positions, per channel."""
    node, layer = step.node, step.node.layer
    channels = int(layer.input_shape[-1])
    _, h, w, _ = layer.input_shape
    _, ho, wo, _ = layer.output_shape
    matrix = avgpool_matrix(layer)
    zeros = np.zeros(ho * wo, np.float32)
    # Constant shapes with -1 for the batch: one RESHAPE each (see _static_reshape).
    x = tf.reshape(ctx.input_of(step), [-1, h * w, channels], name=ctx.fresh_name(node.name, "_positions"))
    x = tf.transpose(x, [0, 2, 1], name=ctx.fresh_name(node.name, "_channels_first"))
    x = tf.reshape(x, [-1, h * w], name=ctx.fresh_name(node.name, "_rows"))  # 2-D: no Tensordot
    new = ctx.folded_conv("dense", matrix, zeros, "linear", node.name, {})
    out = new(x)
    load_folded(new, matrix, zeros)
    out = tf.reshape(out, [-1, channels, ho * wo], name=ctx.fresh_name(node.name, "_unrows"))
    out = tf.transpose(out, [0, 2, 1], name=ctx.fresh_name(node.name, "_channels_last"))
    return tf.reshape(out, [-1, ho, wo, channels], name=ctx.fresh_name(node.name, "_map"))


@dataclasses.dataclass(frozen=True)
class StepBuilder:
    """How one step kind is built.

    Attributes:
      build: (context, step) -> the step's output tensor(s).
      output_range: OWN, INPUT or READERS: where the outputs' range comes from.
    """

    build: Callable[[BuildContext, Step], object]
    output_range: str


# The one registry of step kinds (see plan.Step).
BUILDERS: dict[str, StepBuilder] = {
    "fused": StepBuilder(_build_fused, OWN),
    "affine": StepBuilder(_build_affine, OWN),
    "quantized": StepBuilder(_build_layer, OWN),
    "fixed": StepBuilder(_build_layer, OWN),
    "swish": StepBuilder(_build_swish, OWN),
    "avgpool": StepBuilder(_build_avgpool, OWN),
    "same_scale": StepBuilder(_build_same_scale, INPUT),
    "identity": StepBuilder(_build_identity, INPUT),
    "pre_affine": StepBuilder(_build_passthrough, INPUT),  # folded into the next conv's weights
    "layernorm": StepBuilder(build_layernorm, OWN),  # int8 ops around L2_NORMALIZATION (norm.py)
    "attention": StepBuilder(build_attention, OWN),  # FULLY_CONNECTED, BATCH_MATMUL, SOFTMAX (attention.py)
    "recurrent": StepBuilder(build_recurrent, OWN),  # LSTM/GRU unrolled into int8 cell ops (recurrent.py)
    "float": StepBuilder(_build_float, READERS),
}


def builder_of(kind: str) -> StepBuilder:
    """The registered builder of a step kind.

    Raises:
      ValueError: no builder is registered for `kind` (the valid kinds are listed).
    """
    try:
        return BUILDERS[kind]
    except KeyError:
        raise ValueError(f"no builder for step kind {kind!r}; valid kinds: {', '.join(BUILDERS)}") from None


def _place_output_quantizers(ctx: BuildContext, step: Step, output_range: str, out) -> None:
    """Records a step's outputs in `ctx.tensors`, with a quantizer on those that get their own range."""
    node = step.node
    outs = out if isinstance(out, (list, tuple)) else [out]
    # Only steps that absorb nodes have them, and their outputs are the last absorbed node's.
    last = step.absorbed[-1] if step.absorbed else node
    for tid, t in zip(last.outputs, outs):
        needs_range = output_range == OWN
        if output_range == READERS:
            # TFLite quantizes a float op's output where an int8 op reads it; a one-op layer the scheme keeps
            # float gets no range: with one, the converter would run it in int8 (ops.one_int8_op).
            readers = [ctx.step_of.get(id(c)) for c in ctx.consumers.get(tid, [])]
            needs_range = any(r is not None and r.kind != "float" for r in readers) \
                and not (step.requested and ops.one_int8_op(node.layer))
        if needs_range and ctx.acts is not None and t.dtype.is_floating:
            t = ctx.quant_point(t, node.name, step.fixed_range)
            if ctx.tie is not None:
                ctx.ties.append((ctx.tie, ctx.names[-1]))
            if step.fixed_range is None:
                ctx.point_of[tid] = ctx.names[-1]
                if ops.is_concat(node):
                    ctx.ties.extend((ctx.point_of[i], ctx.names[-1]) for i in node.inputs if i in ctx.point_of)
        elif output_range == INPUT and node.inputs and node.inputs[0] in ctx.point_of:
            ctx.point_of[tid] = ctx.point_of[node.inputs[0]]
        ctx.tensors[tid] = t


class Built(NamedTuple):
    """What `build` returns.

    Attributes:
      model: the built model.
      probes: float twin only: the tensors the calibrated quantizers observe.
      names: every quantizer name, in placement order.
      fixed: the names of quantizers with a range TFLite fixes.
      ties: (a, b) quantizer names calibration gives one range.
    """

    model: keras.Model
    probes: list
    names: list[str]
    fixed: list[str]
    ties: list


def build(flat: g.Graph, steps: list[Step], fused: dict, scheme: QuantScheme, quantize: bool, model_name: str,
          qat: bool = False, ema_decay: float = 0.999) -> Built:
    """Builds the fake-quant model (quantize=True) or its float twin.

    Args:
      flat: the flattened source model.
      steps: its plan (see plan.plan).
      fused: id(step) -> folded (kernel, bias) of each fused step.
      scheme: how weights and activations are quantized.
      quantize: build fake quant (else the float twin, whose probes feed calibration).
      model_name: the source model's name.
      qat: build training layers.
      ema_decay: EMA decay of activation ranges when `qat`.

    Returns:
      The model and its quantizer names.

    Raises:
      ValueError: a step has a kind with no registered builder.
    """
    ctx = BuildContext(flat, steps, fused, scheme, quantize, qat, ema_decay)
    inputs = []
    for tid, (name, shape, dtype) in zip(flat.inputs, flat.input_specs):
        x = keras.Input(shape[1:], batch_size=shape[0], dtype=dtype, name=name)
        inputs.append(x)
        ctx.tensors[tid] = x
        if x.dtype.is_floating and ctx.acts is not None:
            ctx.tensors[tid] = ctx.quant_point(x, name)
            ctx.point_of[tid] = ctx.names[-1]
    for step in steps:
        builder = builder_of(step.kind)
        ctx.tie = None
        out = builder.build(ctx, step)
        _place_output_quantizers(ctx, step, builder.output_range, out)
    outputs = [ctx.tensors[t] for t in flat.outputs]
    model = keras.Model(inputs, outputs, name=f"{model_name}_quant" if quantize else model_name)
    return Built(model, ctx.probes, ctx.names, ctx.fixed, ctx.ties)
