"""The Keras graph rewriter: fold batch norm, fuse activations, place fake-quant.

    from qtoolkit import rewrite, schemes
    result = rewrite.rewrite(model, schemes.load("int8"))
    result.model         # fake-quant model, ranges still to calibrate
    result.float_model   # folded float twin; extra outputs feed the observers
    result.quant_points  # names of the activation quantizers, in that order

Placement follows what TFLite executes (see docs/design.md): a quantizer on
every model input, on the output of every fused Conv/Depthwise/Dense (after
its batch norm and ReLU/ReLU6), of Add/Multiply/Concatenate/average pooling
and activations; none after ops whose int8 kernels keep their input's scale
(max pooling, reshape, flatten, padding, cropping, nearest upsampling,
transpose); fixed ranges for softmax/logistic/tanh, whose output scale
TFLite fixes.  Layers it does not know stay float, each named in a warning.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from typing import Optional

import numpy as np
import tensorflow as tf
import tf_keras as keras

from qtoolkit.rewrite import graph as g
from qtoolkit.rewrite.layers import FoldedConv, QuantizeActivation, RangeQuantizer, ScaleMap
from qtoolkit.rewrite.qat_layers import QATFoldedConv, QATQuantizeActivation
from qtoolkit.schemes import QuantScheme

log = logging.getLogger("qtoolkit")
L = keras.layers


class UnquantizableLayersError(ValueError):
    """Raised in strict mode when some layers would stay float."""


# Ops whose TFLite int8 kernels require the output scale to equal the input's.
SAME_SCALE = (L.MaxPooling2D, L.MaxPooling1D, L.AveragePooling2D, L.AveragePooling1D, L.GlobalMaxPooling2D, L.GlobalMaxPooling1D, L.Reshape,
              L.Flatten, L.ZeroPadding2D, L.ZeroPadding1D, L.Cropping2D, L.Permute)
# Quantized ops that get their own output range.
QUANTIZED = (L.Add, L.Subtract, L.Multiply, L.Average, L.Maximum, L.Minimum, L.Concatenate,
             L.GlobalAveragePooling2D, L.GlobalAveragePooling1D,
             L.ReLU, L.LeakyReLU, L.Rescaling, L.Normalization, L.PReLU, L.ELU)
IDENTITY = (L.Dropout, L.SpatialDropout1D, L.SpatialDropout2D, L.GaussianNoise, L.GaussianDropout,
            L.AlphaDropout, L.ActivityRegularization)
QUANTIZED_ACTIVATIONS = ("relu", "relu6", "sigmoid", "tanh", "swish", "silu", "hard_sigmoid", "elu",
                         "leaky_relu", "gelu", "hard_swish", "softmax")
# TFLite fixes these ops' int8 output scale/zero-point; the simulation uses the same range.
FIXED_RANGE_8BIT = {"softmax": (0.0, 255 / 256), "sigmoid": (0.0, 255 / 256), "tanh": (-1.0, 127 / 128)}
SAME_SCALE_TF_OPS = ("reshape", "compat.v1.transpose", "transpose", "compat.v1.squeeze", "squeeze",
                     "expand_dims", "nn.max_pool2d", "image.resize")
QUANTIZED_TF_OPS = ("__operators__.add", "math.add", "math.subtract", "math.multiply", "math.truediv",
                    "nn.relu", "nn.relu6", "math.sigmoid", "nn.silu", "nn.swish", "math.tanh", "concat",
                    "math.reduce_mean", "nn.avg_pool2d", "math.maximum", "math.minimum")
# An average pooling's window and output share one range when at least this fraction of
# positions has the full count (the MUL by the count map is then exact there).
TIE_FULL_FRACTION = 0.5
# A 'same' average pooling with uneven counts over a map of at most this many positions runs
# as one FULLY_CONNECTED over the positions (weights 1/count: one rounding, like TFLite's
# AVERAGE_POOL_2D); larger maps use a depthwise conv and a count-map MUL (the matrix grows
# with the square of the positions).
SMALL_MAP_POSITIONS = 100
FUSE_AFTER = (L.Add, L.Subtract, L.Multiply)  # TFLite fuses a following ReLU/ReLU6 into these


@dataclasses.dataclass
class Rewritten:
    """What `rewrite` returns.

    Attributes:
      model: the fake-quant model (same inputs and outputs as the original).
      float_model: the folded float twin; outputs are the original outputs
        followed by the input of each calibrated activation quantizer.
      quant_points: calibrated QuantizeActivation layer names, in float_model's extra-output order.
      fixed_points: names of quantizers with a range TFLite fixes (not calibrated).
      folded: one line per fused pattern, e.g. "conv1+bn1+relu1".
      float_layers: names of the layers left in float.
      tied_points: (a, b) quantizer names that calibration gives one range,
        the union of what each observes (transitively): an average pooling's
        window and its count-corrected output (equal scales make the MUL exact
        where the count is full), and a concatenation's output and the range
        of each input (TFLite gives a CONCATENATION's inputs its output scale;
        an input whose range is set elsewhere — through a max pooling, or
        another concatenation — otherwise costs a requantizing QUANTIZE op and
        a second rounding).
    """

    model: keras.Model
    float_model: keras.Model
    quant_points: list[str]
    fixed_points: list[str]
    folded: list[str]
    float_layers: list[str]
    tied_points: list = dataclasses.field(default_factory=list)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.\-]", "_", name)


def _activation_name(layer) -> Optional[str]:
    """'relu', 'relu6', 'linear', ... for activation-like layers, else None."""
    if isinstance(layer, L.ReLU):
        if float(layer.negative_slope) == 0.0 and float(layer.threshold) == 0.0:
            if layer.max_value is None:
                return "relu"
            if float(layer.max_value) == 6.0:
                return "relu6"
        return None
    if isinstance(layer, L.Activation):
        return getattr(layer.activation, "__name__", None)
    if type(layer).__name__ == "TFOpLambda" and getattr(layer, "symbol", "") in ("nn.relu", "nn.relu6"):
        return layer.symbol[3:]
    return None


def _conv_kind(layer) -> Optional[str]:
    if isinstance(layer, L.DepthwiseConv2D):
        return "depthwise" if layer.data_format == "channels_last" else None
    if isinstance(layer, L.Conv2D) and not isinstance(layer, L.Conv2DTranspose):
        ok = type(layer) in (L.Conv2D,) and layer.groups == 1 and layer.data_format == "channels_last"
        return "conv2d" if ok else None
    if type(layer) is L.Dense:
        return "dense"
    return None


def _bn_weights(bn) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(gamma, beta, moving mean, moving variance) of a batch norm; gamma/beta default to 1/0."""
    weights = {w.name.split("/")[-1].split(":")[0]: w.numpy() for w in bn.weights}
    var, mean = weights["moving_variance"], weights["moving_mean"]
    return weights.get("gamma", np.ones_like(var)), weights.get("beta", np.zeros_like(var)), mean, var


def _bn_params(bn) -> tuple[np.ndarray, np.ndarray]:
    """(scale, offset) of an inference-mode batch norm: y = x * scale + offset."""
    gamma, beta, mean, var = _bn_weights(bn)
    scale = gamma / np.sqrt(var + bn.epsilon)
    return scale.astype(np.float32), (beta - mean * scale).astype(np.float32)


def _affine_params(layer) -> Optional[tuple[np.ndarray, np.ndarray]]:
    """Per-channel (scale, offset) of BatchNormalization / Rescaling / Normalization, or None."""
    if isinstance(layer, L.BatchNormalization):
        return _bn_params(layer)
    shape = layer.input_shape
    if isinstance(shape, list) or shape[-1] is None:
        return None
    channels = shape[-1]
    try:
        if isinstance(layer, L.Rescaling):
            scale = np.broadcast_to(np.asarray(layer.scale, np.float32), (channels,))
            offset = np.broadcast_to(np.asarray(layer.offset, np.float32), (channels,))
        else:
            if getattr(layer, "invert", False):
                return None
            mean = np.asarray(layer.mean, np.float32).reshape(-1)
            std = np.sqrt(np.asarray(layer.variance, np.float32).reshape(-1))
            std = np.maximum(std, keras.backend.epsilon())
            scale = np.broadcast_to(1.0 / std, (channels,))
            offset = np.broadcast_to(-mean / std, (channels,))
    except (ValueError, TypeError, AttributeError):
        return None  # a non-channel broadcast: leave the layer as it is
    return scale.astype(np.float32).copy(), offset.astype(np.float32).copy()


ADD_TF_OPS = ("__operators__.add", "math.add")


def _constant_add(node: g.Node) -> Optional[tuple[np.ndarray, np.ndarray]]:
    """(scale 1, offset c) per channel when `node` is tensor + constant (a TFOpLambda), else None.

    MobileNetV3's hard sigmoid is relu6(x + 3) / 6: TFLite's int8 ADD of the
    constant 3 leaves XNNPACK when the input's scale is far below the output's
    (scale ratio under 2^-10), and the converter's PTQ fuses the pattern into
    HARD_SWISH, which XNNPACK has no int8 kernel for.  As a 1x1 depthwise conv
    (weight 1, bias c, ReLU6 fused) it is one int8 op XNNPACK always takes.
    """
    if getattr(node.layer, "symbol", None) not in ADD_TF_OPS or len(node.inputs) != 1 or len(node.outputs) != 1:
        return None
    consts = [a for a in (*node.args, *(v for k, v in node.kwargs.items() if k != "name"))
              if not isinstance(a, g.TensorRef) and a is not None]
    shape = node.layer.output_shape
    if len(consts) != 1 or isinstance(shape, list) or len(shape) < 2 or shape[-1] is None:
        return None
    try:
        c = np.asarray(consts[0], np.float32)
    except (TypeError, ValueError):
        return None
    channels = int(shape[-1])
    if c.size not in (1, channels) or (c.ndim > 1 and c.size != 1 and c.shape[-1] != channels):
        return None
    offset = np.broadcast_to(c.reshape(-1), (channels,)).astype(np.float32).copy()
    return np.ones(channels, np.float32), offset


def _avgpool_as_depthwise(layer) -> bool:
    """An AveragePooling2D the rewriter runs as a depthwise conv (XNNPACK has no int8 average pooling)."""
    shape = layer.input_shape if isinstance(layer, L.AveragePooling2D) else None
    return shape is not None and not isinstance(shape, list) and layer.data_format == "channels_last" \
        and all(d is not None for d in shape[1:])


def _is_concat(node) -> bool:
    return isinstance(node.layer, L.Concatenate) or getattr(node.layer, "symbol", None) == "concat"


def _avgpool_correction(layer) -> np.ndarray:
    """(1, H, W, 1): window size / valid elements per output position ('same' padding excludes the pad)."""
    _, h, w, _ = layer.input_shape
    ones = tf.ones((1, h, w, 1))
    counts = tf.nn.conv2d(ones, tf.ones((*layer.pool_size, 1, 1)), layer.strides, layer.padding.upper())
    return (float(np.prod(layer.pool_size)) / counts.numpy()).astype(np.float32)


def _avgpool_matrix(layer) -> np.ndarray:
    """(H*W, Ho*Wo): the average pooling as a linear map over positions (column p: 1/count_p on its window)."""
    _, h, w, _ = layer.input_shape
    one_hot = tf.reshape(tf.eye(h * w), (h * w, h, w, 1))
    pooled = tf.nn.avg_pool2d(one_hot, layer.pool_size, layer.strides, layer.padding.upper())
    return pooled.numpy().reshape(h * w, -1).astype(np.float32)


def _constant_multiply(node: g.Node) -> Optional[float]:
    """k when `node` is tensor * scalar constant k (a TFOpLambda), else None."""
    if getattr(node.layer, "symbol", None) != "math.multiply" or len(node.inputs) != 1 or len(node.outputs) != 1:
        return None
    consts = [a for a in (*node.args, *(v for k, v in node.kwargs.items() if k != "name"))
              if not isinstance(a, g.TensorRef) and a is not None]
    if len(consts) != 1 or np.size(consts[0]) != 1:
        return None
    try:
        return float(np.asarray(consts[0], np.float32).reshape(()))
    except (TypeError, ValueError):
        return None


def _pools_one_position(layer) -> bool:
    """A global pooling over a map of one position (InceptionV3's last map at 96x96): a reshape."""
    if not isinstance(layer, (L.GlobalAveragePooling2D, L.GlobalAveragePooling1D, L.GlobalMaxPooling2D,
                              L.GlobalMaxPooling1D)) or isinstance(layer.input_shape, list):
        return False
    shape = layer.input_shape
    pooled = shape[1:-1] if layer.data_format == "channels_last" else shape[2:]
    return all(d == 1 for d in pooled)


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
    if not (isinstance(node.layer, L.Reshape) or _pools_one_position(node.layer)) or len(node.inputs) != 1:
        return None
    shape = node.layer.output_shape
    if isinstance(shape, list) or any(d is None for d in shape[1:]):
        return None
    return [-1, *(int(d) for d in shape[1:])]


def _is_affine(layer) -> bool:
    """A per-channel affine layer the rewriter turns into a 1x1 depthwise conv."""
    return (isinstance(layer, L.BatchNormalization) and _is_channel_last_bn(layer, len(layer.input_shape))) \
        or (isinstance(layer, (L.Rescaling, L.Normalization)) and _affine_params(layer) is not None)


def _is_channel_last_bn(bn, rank: int) -> bool:
    axis = bn.axis if isinstance(bn.axis, (list, tuple)) else [bn.axis]
    return len(axis) == 1 and axis[0] in (-1, rank - 1) and not getattr(bn, "renorm", False)


@dataclasses.dataclass
class _Step:
    kind: str              # fused | affine | quantized | same_scale | identity | float | fixed
    node: g.Node
    absorbed: list = dataclasses.field(default_factory=list)
    activation: str = "linear"
    fixed_range: Optional[tuple] = None
    affine: Optional[tuple] = None   # (scale, offset) of an affine step that is not a layer's own
    pre_affine: Optional[tuple] = None   # (scale, offset) per input channel folded into a conv
    into: Optional[str] = None   # the conv a pre_affine step is folded into


def _affine_target(step: _Step, nxt, single_consumer):
    """The conv an affine step folds into exactly, or None.

    conv(pad(s x + o)) == conv'(pad(x)) with the kernel scaled by s per input
    channel when o is zero (zero padding commutes with a scale), and with the
    bias also taking sum(kernel * o) when no padding is involved.  Like the
    converter does for EfficientNet's Rescaling, this saves an int8 depthwise
    pass over the input, slow on few channels (3/16 of XNNPACK's channel tile).
    """
    scale, offset = step.affine
    zero_offset = not np.any(offset)
    if nxt is not None and isinstance(nxt.layer, L.ZeroPadding2D) and zero_offset:
        nxt = single_consumer(nxt.outputs[0])
        padded = True
    else:
        padded = False
    if nxt is None or len(nxt.inputs) != 1 or _conv_kind(nxt.layer) not in ("conv2d", "depthwise"):
        return None
    if not zero_offset and (padded or nxt.layer.padding != "valid"):
        return None
    if not np.all(np.isfinite(scale)) or not np.all(np.isfinite(offset)):
        return None
    return nxt


def _plan(graph: g.Graph, scheme: QuantScheme, fold_affine: bool = True) -> list[_Step]:
    pre_affine: dict[int, tuple] = {}
    consumers = graph.consumers()
    outputs = set(graph.outputs)
    absorbed: set[int] = set()
    steps = []

    def single_consumer(tensor):
        users = consumers.get(tensor, [])
        return users[0] if len(users) == 1 and tensor not in outputs else None

    fixed_8bit = scheme.activations is not None and scheme.activations.bits == 8
    for node in graph.nodes:
        if id(node) in absorbed:
            continue
        layer = node.layer
        kind = _conv_kind(layer)
        if kind and len(node.inputs) == 1 and len(node.outputs) == 1:
            step = _Step("fused", node, activation=getattr(layer.activation, "__name__", "?"))
            if step.activation not in ("linear", "relu", "relu6"):
                if step.activation in FIXED_RANGE_8BIT and scheme.activations is not None \
                        and scheme.activations.bits == 8:
                    step.fixed_range = FIXED_RANGE_8BIT[step.activation]
                step.activation = "?"
            nxt = single_consumer(node.outputs[0])
            if step.activation == "linear" and nxt is not None and isinstance(nxt.layer, L.BatchNormalization) \
                    and _is_channel_last_bn(nxt.layer, len(nxt.layer.input_shape)):
                step.absorbed.append(nxt)
                absorbed.add(id(nxt))
                nxt = single_consumer(nxt.outputs[0])
            if step.activation == "linear" and nxt is not None and _activation_name(nxt.layer) in ("relu", "relu6"):
                step.activation = _activation_name(nxt.layer)
                step.absorbed.append(nxt)
                absorbed.add(id(nxt))
            steps.append(step)
        elif _is_affine(layer):
            step = _Step("affine", node, affine=_affine_params(layer))
            nxt = single_consumer(node.outputs[0])
            while nxt is not None and _is_affine(nxt.layer):
                # Consecutive affine layers (EfficientNet's Rescaling then Normalization) are one
                # 1x1 depthwise conv: one int8 op at input resolution instead of two.
                scale, offset = _affine_params(nxt.layer)
                step.affine = (step.affine[0] * scale, step.affine[1] * scale + offset)
                step.absorbed.append(nxt)
                absorbed.add(id(nxt))
                nxt = single_consumer(nxt.outputs[0])
            # Only preprocessing on a model input: elsewhere the 1x1 depthwise conv keeps its own range.
            on_input = node.inputs and node.inputs[0] in graph.inputs
            conv = _affine_target(step, nxt, single_consumer) if fold_affine and on_input else None
            if conv is not None:
                step.kind = "pre_affine"  # folded into the conv's kernel and bias (see _fold)
                pre_affine[id(conv)] = step.affine
                step.into = conv.name
            steps.append(step)
        elif _constant_add(node) is not None and scheme.activations is not None:
            step = _Step("affine", node, affine=_constant_add(node))
            nxt = single_consumer(node.outputs[0])
            if nxt is not None and _activation_name(nxt.layer) in ("relu", "relu6"):
                step.activation = _activation_name(nxt.layer)
                step.absorbed.append(nxt)
                absorbed.add(id(nxt))
                after = single_consumer(nxt.outputs[0])
                factor = _constant_multiply(after) if after is not None else None
                if step.activation == "relu6" and factor is not None and factor > 0 and fixed_8bit:
                    # relu6(x + c) * k == clip(k x + k c, 0, 6 k): a linear conv whose output
                    # range [0, 6 k] is fixed; the int8 output saturates exactly there.
                    step.affine = (step.affine[0] * factor, step.affine[1] * factor)
                    step.activation = "linear"
                    step.fixed_range = (0.0, 6.0 * factor)
                    step.absorbed.append(after)
                    absorbed.add(id(after))
            steps.append(step)
        elif fixed_8bit and _avgpool_as_depthwise(layer):
            steps.append(_Step("avgpool", node))
        elif isinstance(layer, IDENTITY) or _activation_name(layer) == "linear":
            steps.append(_Step("identity", node))
        elif isinstance(layer, SAME_SCALE) or (isinstance(layer, L.UpSampling2D) and layer.interpolation == "nearest") \
                or getattr(layer, "symbol", None) in SAME_SCALE_TF_OPS or _pools_one_position(layer):
            steps.append(_Step("same_scale", node))
        else:
            act = _activation_name(layer)
            if isinstance(layer, L.Softmax):
                act = "softmax"
            symbol = getattr(layer, "symbol", None)
            fixed_8bit = scheme.activations is not None and scheme.activations.bits == 8
            if fixed_8bit and (act in ("swish", "silu") or symbol in ("nn.silu", "nn.swish")) \
                    and len(node.inputs) == 1:
                steps.append(_Step("swish", node))
            elif act in FIXED_RANGE_8BIT and fixed_8bit:
                steps.append(_Step("fixed", node, fixed_range=FIXED_RANGE_8BIT[act]))
            elif isinstance(layer, QUANTIZED) or act in QUANTIZED_ACTIVATIONS or symbol in QUANTIZED_TF_OPS:
                step = _Step("quantized", node)
                nxt = single_consumer(node.outputs[0]) if len(node.outputs) == 1 else None
                if isinstance(layer, FUSE_AFTER) and nxt is not None and _activation_name(nxt.layer) in ("relu", "relu6"):
                    step.absorbed.append(nxt)
                    absorbed.add(id(nxt))
                steps.append(step)
            else:
                steps.append(_Step("float", node))
    for step in steps:
        if step.kind == "fused" and id(step.node) in pre_affine:
            step.pre_affine = pre_affine[id(step.node)]
    return steps


def _kernel_and_bias(layer) -> tuple[np.ndarray, np.ndarray]:
    """A Conv2D / DepthwiseConv2D / Dense layer's kernel and bias (zeros without one)."""
    depthwise = isinstance(layer, L.DepthwiseConv2D)
    kernel = (layer.depthwise_kernel if depthwise else layer.kernel).numpy()
    units = kernel.shape[2] * kernel.shape[3] if depthwise else kernel.shape[-1]
    return kernel, layer.bias.numpy() if layer.use_bias else np.zeros(units, np.float32)


def _fold(step: _Step) -> tuple[np.ndarray, np.ndarray]:
    """Kernel and bias of a fused step with its batch norm folded in."""
    layer = step.node.layer
    kernel, bias = _kernel_and_bias(layer)
    if step.pre_affine is not None:
        scale, offset = step.pre_affine
        if isinstance(layer, L.DepthwiseConv2D):
            bias = bias + (kernel.sum(axis=(0, 1)) * offset[:, None]).reshape(-1)
        else:
            bias = bias + np.einsum("hwio,i->o", kernel, offset)
        kernel = kernel * scale[None, None, :, None]
    for extra in step.absorbed:
        if isinstance(extra.layer, L.BatchNormalization):
            scale, offset = _bn_params(extra.layer)
            if isinstance(layer, L.DepthwiseConv2D):
                kernel = kernel * scale.reshape(kernel.shape[2], kernel.shape[3])
            else:
                kernel = kernel * scale
            bias = bias * scale + offset
    return kernel.astype(np.float32), bias.astype(np.float32)


def rewrite(model, scheme: QuantScheme, strict: bool = False, qat: bool = False,
            ema_decay: float = 0.999) -> Rewritten:
    """Rewrites a tf_keras model for quantization (see the module docstring).

    Args:
      model: a built tf_keras Functional or Sequential model (nested models are inlined).
      scheme: how weights and activations are quantized.
      strict: raise instead of leaving unknown layers in float.
      qat: build training layers (batch norm folded with correction, EMA ranges).
      ema_decay: EMA decay of activation ranges when `qat`.

    Returns:
      A Rewritten with the fake-quant model and its float twin.

    Raises:
      graph.UnsupportedModelError: the model cannot be flattened.
      UnquantizableLayersError: strict and some layers would stay float (all named).
    """
    flat = g.flatten(model)
    steps = _plan(flat, scheme, fold_affine=not qat)
    float_steps = [s for s in steps if s.kind == "float"]
    float_names = [s.node.name for s in float_steps]
    if float_names and strict:
        raise UnquantizableLayersError(
            f"{len(float_names)} layer(s) cannot be quantized and would stay float: {', '.join(float_names)}")
    for s in float_steps:
        log.warning("layer %s (%s) has no qtoolkit rewrite: it is kept as is and unquantized in the simulation; "
                    "TFLite runs it in int8 only if it has an int8 kernel for it (see the float ops of the "
                    "inspection)", s.node.name, type(s.node.layer).__name__)
    fused = {id(s): _fold(s) for s in steps if s.kind == "fused"}
    qmodel, _, names, fixed, ties = _build(flat, steps, fused, scheme, quantize=True, model_name=model.name,
                                           qat=qat, ema_decay=ema_decay)
    fmodel, probes, names_f, _, _ = _build(flat, steps, fused, scheme, quantize=False, model_name=model.name)
    assert names == names_f
    float_model = keras.Model(fmodel.inputs, [*fmodel.outputs, *probes], name=f"{model.name}_float_twin")
    folded = ["+".join([s.node.name, *(a.name for a in s.absorbed)]) + (f" into {s.into}" if s.into else "")
              for s in steps if s.absorbed or s.into]
    return Rewritten(qmodel, float_model, [n for n in names if n not in fixed], fixed, folded, float_names, ties)


def _build(flat: g.Graph, steps, fused, scheme: QuantScheme, quantize: bool, model_name: str,
           qat: bool = False, ema_decay: float = 0.999):
    """Builds the fake-quant model (quantize=True) or its float twin."""
    acts = scheme.activations
    tensors: dict[int, object] = {}
    float_tensors: set[int] = set()   # tensors that TFLite will keep in float
    probes, names, fixed, ties = [], [], [], []
    inputs = []
    used_names: set[str] = set()

    def unique(name):
        base, i = name, 1
        while name in used_names:
            name, i = f"{base}_{i}", i + 1
        used_names.add(name)
        return name

    def quant_point(tensor, name, fixed_range=None):
        """Puts an activation quantizer on `tensor` (or records the probe in float mode)."""
        name = unique(_safe(name) + "_quant")
        names.append(name)
        if fixed_range is not None:
            fixed.append(name)
        if not quantize or acts is None:
            if fixed_range is None:  # fixed ranges are not calibrated: no probe
                probes.append(tensor)
            return tensor
        quantizer = RangeQuantizer(acts.bits, acts.symmetric, acts.narrow_range)
        if qat:
            return QATQuantizeActivation(quantizer, fixed_range=fixed_range, ema_decay=ema_decay, name=name)(tensor)
        return QuantizeActivation(quantizer, fixed_range=fixed_range, name=name)(tensor)

    point_of = {}  # tensor id -> the calibrated quantizer that sets its range (through same-scale ops)
    for tid, (name, shape, dtype) in zip(flat.inputs, flat.input_specs):
        x = keras.Input(shape[1:], batch_size=shape[0], dtype=dtype, name=name)
        inputs.append(x)
        tensors[tid] = x
        if x.dtype.is_floating and acts is not None:
            tensors[tid] = quant_point(x, name)
            point_of[tid] = names[-1]

    consumers = flat.consumers()
    step_of = {id(s.node): s for s in steps}
    fixed_8bit = acts is not None and acts.bits == 8

    def folded_conv(kind, kernel, bias, act, name, conv_args):
        wq = scheme.weights
        quantizer = RangeQuantizer(wq.bits, wq.symmetric, wq.narrow_range,
                                   per_channel=wq.granularity == "per_channel",
                                   channels=bias.shape[0]) if quantize else None
        return FoldedConv(kind, kernel.shape, bias.shape[0], act, quantizer, name=unique(_safe(name)), **conv_args)

    def qat_conv(step, kind, act, conv_args):
        """A QATFoldedConv holding the unfolded kernel and the batch norm's parameters."""
        kernel, bias = _kernel_and_bias(step.node.layer)
        units = bias.shape[0]
        bns = [a.layer for a in step.absorbed if isinstance(a.layer, L.BatchNormalization)]
        wq = scheme.weights
        quantizer = RangeQuantizer(wq.bits, wq.symmetric, wq.narrow_range,
                                   per_channel=wq.granularity == "per_channel", channels=units)
        weights = [kernel, bias]
        kwargs = {}
        if bns:
            weights += list(_bn_weights(bns[0]))
            kwargs = {"epsilon": bns[0].epsilon, "momentum": bns[0].momentum}
        new = QATFoldedConv(kind, kernel.shape, units, act, quantizer, has_bn=bool(bns), name=unique(_safe(step.node.name)),
                            **kwargs, **conv_args)
        return new, weights

    def load_folded(layer, kernel, bias):
        layer.set_weights([kernel, bias] + [np.zeros_like(w.numpy()) for w in layer.weights[2:]])
        layer.calibrate_weights()

    def swish(x, name):
        """x * sigmoid(x), as TFLite runs it: LOGISTIC (fixed output range) then MUL."""
        sig = L.Activation("sigmoid", name=unique(_safe(name) + "_sigmoid"))(x)
        sig = quant_point(sig, name + "_sigmoid", FIXED_RANGE_8BIT["sigmoid"])
        return L.Multiply(name=unique(_safe(name) + "_mul"))([x, sig])

    for step in steps:
        node = step.node
        tie = None
        if step.kind == "float":
            # A float layer's float inputs stay float: dequantized by TFLite.
            out = g.call(node, tensors)
        elif step.kind == "fused":
            layer = node.layer
            kernel, bias = fused[id(step)]
            kind = _conv_kind(layer)
            act = "linear" if step.activation == "?" else step.activation
            conv_args = {} if kind == "dense" else {
                "strides": layer.strides, "padding": layer.padding, "dilation_rate": layer.dilation_rate}
            if qat and quantize:
                new, weights = qat_conv(step, kind, act, conv_args)
                out = g.call(node, tensors, layer=new)
                new.set_weights(weights + [w.numpy() for w in new.weights[len(weights):]])
            else:
                new = folded_conv(kind, kernel, bias, act, node.name, conv_args)
                out = g.call(node, tensors, layer=new)
                load_folded(new, kernel, bias)
            if step.activation == "?":
                # Non-fusable activation (e.g. swish): TFLite runs it as its own op.
                out = quant_point(out, node.name + "_preact")
                act_name = getattr(layer.activation, "__name__", "")
                out = swish(out, node.name) if act_name in ("swish", "silu") and fixed_8bit else \
                    L.Activation(layer.activation, name=unique(_safe(node.name) + "_act"))(out)
        elif step.kind == "swish":
            out = swish(tensors[node.inputs[0]], node.name)
        elif step.kind == "affine":
            # A batch norm after no conv: a 1x1 depthwise conv (per-channel int8
            # weights), which TFLite runs in int8; other ranks are reshaped to 4-D.
            scale, offset = step.affine or _affine_params(node.layer)
            x = tensors[node.inputs[0]]
            rank = x.shape.rank
            channels = scale.shape[0]
            if node.inputs[0] in flat.inputs and channels <= 4 and step.activation in (None, "linear") \
                    and step.fixed_range is None:
                # Preprocessing of a few-channel model input (an image): int8 MUL and ADD of constants,
                # as the converter keeps them. A 1x1 depthwise conv over 3 channels fills 3 of XNNPACK's
                # 16-channel tile: 0.3 ms against 0.02 ms at 224x224x3 (scripts/bench_layers.py).
                uniform = np.allclose(scale, scale[0]) and np.allclose(offset, offset[0])
                a, b = (float(scale[0]), float(offset[0])) if uniform else (scale, offset)
                out = tf.multiply(x, a, name=unique(_safe(node.name) + "_mul"))
                out = quant_point(out, node.name + "_scaled")
                out = tf.add(out, b, name=unique(_safe(node.name) + "_add"))
            else:
                if rank != 4:
                    spatial = int(np.prod(x.shape[1:-1])) if rank > 2 else 1
                    x = L.Reshape((1, spatial, channels), name=unique(_safe(node.name) + "_to4d"))(x)
                kernel = scale.reshape(1, 1, channels, 1)
                new = folded_conv("depthwise", kernel, offset, step.activation, node.name,
                                  {"strides": (1, 1), "padding": "valid", "dilation_rate": (1, 1)})
                out = new(x)
                load_folded(new, kernel, offset)
                if rank != 4:
                    out = L.Reshape(tuple(tensors[node.inputs[0]].shape[1:]),
                                    name=unique(_safe(node.name) + "_back"))(out)
            if step.fixed_range is not None and not quantize:
                # The quantizer's fixed range clips the fake-quant model; the float twin clips explicitly.
                out = L.ReLU(max_value=step.fixed_range[1], name=unique(_safe(node.name) + "_clip"))(out)
        elif step.kind == "avgpool":
            # Average pooling = depthwise conv with weights 1/count (exact in int8 per channel).
            # 'same' padding divides each output by its own count of valid inputs: when every
            # position has the same count (small maps, e.g. 3x3 over 2x2) that is the weight;
            # on a small map a FULLY_CONNECTED over positions holds every 1/count; otherwise a
            # MUL by the constant window/count map follows (one more rounding).
            layer = node.layer
            channels = int(layer.input_shape[-1])
            correction = _avgpool_correction(layer)
            uniform = np.allclose(correction, correction.flat[0], rtol=1e-6, atol=0)
            _, h, w, _ = layer.input_shape
            _, ho, wo, _ = layer.output_shape
            # Per-channel weights store every column's 1/count exactly (its largest weight).
            if not uniform and h * w <= SMALL_MAP_POSITIONS and scheme.weights is not None \
                    and scheme.weights.granularity == "per_channel":
                matrix = _avgpool_matrix(layer)
                zeros = np.zeros(ho * wo, np.float32)
                # Constant shapes with -1 for the batch: one RESHAPE each (see _static_reshape).
                x = tf.reshape(tensors[node.inputs[0]], [-1, h * w, channels],
                               name=unique(_safe(node.name) + "_positions"))
                x = tf.transpose(x, [0, 2, 1], name=unique(_safe(node.name) + "_channels_first"))
                x = tf.reshape(x, [-1, h * w], name=unique(_safe(node.name) + "_rows"))  # 2-D: no Tensordot
                new = folded_conv("dense", matrix, zeros, "linear", node.name, {})
                out = new(x)
                load_folded(new, matrix, zeros)
                out = tf.reshape(out, [-1, channels, ho * wo], name=unique(_safe(node.name) + "_unrows"))
                out = tf.transpose(out, [0, 2, 1], name=unique(_safe(node.name) + "_channels_last"))
                out = tf.reshape(out, [-1, ho, wo, channels], name=unique(_safe(node.name) + "_map"))
            else:
                weight = (float(correction.flat[0]) if uniform else 1.0) / np.prod(layer.pool_size)
                kernel = np.full((*layer.pool_size, channels, 1), weight, np.float32)
                zeros = np.zeros(channels, np.float32)
                new = folded_conv("depthwise", kernel, zeros, "linear", node.name,
                                  {"strides": layer.strides, "padding": layer.padding, "dilation_rate": (1, 1)})
                out = new(tensors[node.inputs[0]])
                load_folded(new, kernel, zeros)
                if not uniform:
                    out = quant_point(out, node.name + "_window")
                    if np.mean(np.isclose(correction, 1.0)) >= TIE_FULL_FRACTION:
                        tie = names[-1]
                    out = ScaleMap(correction, quantize=quantize, name=unique(_safe(node.name) + "_count"))(out)
        elif step.kind == "identity" and qat and quantize and isinstance(node.layer, IDENTITY):
            # Dropout & co. regularize QAT as they did float training (identity at inference and export).
            layer = node.layer.__class__.from_config({**node.layer.get_config(), "name": unique(_safe(node.name))})
            out = layer(tensors[node.inputs[0]])
        elif step.kind in ("identity", "pre_affine"):
            out = tensors[node.inputs[0]]
        elif step.kind == "same_scale" and _static_reshape(node) is not None:
            out = tf.reshape(tensors[node.inputs[0]], _static_reshape(node), name=unique(_safe(node.name)))
        else:
            out = g.call(node, tensors)
            for extra in step.absorbed:
                out = extra.layer(out)
        outs = out if isinstance(out, (list, tuple)) else [out]
        last = step.absorbed[-1] if step.kind in ("fused", "quantized", "affine", "pre_affine") and step.absorbed \
            else node
        out_ids = last.outputs
        for tid, t in zip(out_ids, outs):
            needs_range = step.kind in ("fused", "affine", "quantized", "fixed", "swish", "avgpool")
            if step.kind == "float":
                float_tensors.add(tid)
                # TFLite quantizes a float op's output where an int8 op reads it.
                readers = [step_of.get(id(c)) for c in consumers.get(tid, [])]
                needs_range = any(r is not None and r.kind not in ("float",) for r in readers)
            if step.kind == "same_scale" and node.inputs and node.inputs[0] in float_tensors:
                float_tensors.add(tid)
            if needs_range and acts is not None and t.dtype.is_floating:
                t = quant_point(t, node.name, step.fixed_range)
                if tie is not None:
                    ties.append((tie, names[-1]))
                if step.fixed_range is None:
                    point_of[tid] = names[-1]
                    if _is_concat(node):
                        ties.extend((point_of[i], names[-1]) for i in node.inputs if i in point_of)
            elif step.kind in ("same_scale", "identity", "pre_affine") and node.inputs and node.inputs[0] in point_of:
                point_of[tid] = point_of[node.inputs[0]]
            tensors[tid] = t
    outputs = [tensors[t] for t in flat.outputs]
    model = keras.Model(inputs, outputs, name=f"{model_name}_quant" if quantize else model_name)
    return model, probes, names, fixed, ties
