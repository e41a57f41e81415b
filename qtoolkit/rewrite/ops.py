"""Op policy: what TFLite's int8 graph does with each Keras layer or TF op.

This module owns the tables the planner reads, and nothing else: which ops
keep their input's scale, which get their own output range, which are
identities at inference, which activations fuse into the op before them and
which output ranges TFLite fixes.  To teach the rewriter a new op, add it to
one table here; `plan.py` turns the tables into steps and `build.py` builds
each step kind.

    from qtoolkit.rewrite import ops
    ops.conv_kind(layer)          # "conv2d" | "conv1d" | "depthwise" | "dense" | None
    ops.activation_name(layer)    # "relu", "relu6", "linear", ... or None
    ops.is_same_scale(layer)      # an int8 kernel that keeps its input's scale
"""

from __future__ import annotations

from typing import Optional

import tf_keras as keras

L = keras.layers

# Ops whose TFLite int8 kernels require the output scale to equal the input's.
SAME_SCALE = (L.MaxPooling2D, L.MaxPooling1D, L.AveragePooling2D, L.AveragePooling1D, L.GlobalMaxPooling2D, L.GlobalMaxPooling1D, L.Reshape,
              L.Flatten, L.ZeroPadding2D, L.ZeroPadding1D, L.Cropping2D, L.Permute)
SAME_SCALE_TF_OPS = ("reshape", "compat.v1.transpose", "transpose", "compat.v1.squeeze", "squeeze",
                     "expand_dims", "nn.max_pool2d", "image.resize")
# Quantized ops that get their own output range.
QUANTIZED = (L.Add, L.Subtract, L.Multiply, L.Average, L.Maximum, L.Minimum, L.Concatenate,
             L.GlobalAveragePooling2D, L.GlobalAveragePooling1D,
             L.ReLU, L.LeakyReLU, L.Rescaling, L.Normalization, L.PReLU, L.ELU,
             L.Embedding)  # GATHER: the converter quantizes the table per tensor on its output's grid
QUANTIZED_TF_OPS = ("__operators__.add", "math.add", "math.subtract", "math.multiply", "math.truediv",
                    "nn.relu", "nn.relu6", "math.sigmoid", "nn.silu", "nn.swish", "math.tanh", "concat",
                    "math.reduce_mean", "nn.avg_pool2d", "math.maximum", "math.minimum")
QUANTIZED_ACTIVATIONS = ("relu", "relu6", "sigmoid", "tanh", "swish", "silu", "hard_sigmoid", "elu",
                         "leaky_relu", "gelu", "hard_swish", "softmax")
# Layers that do nothing at inference: TFLite drops them, so they take no quantizer.
IDENTITY = (L.Dropout, L.SpatialDropout1D, L.SpatialDropout2D, L.GaussianNoise, L.GaussianDropout,
            L.AlphaDropout, L.ActivityRegularization)
# TFLite fixes these ops' int8 output scale/zero-point; the simulation uses the same range.
FIXED_RANGE_8BIT = {"softmax": (0.0, 255 / 256), "sigmoid": (0.0, 255 / 256), "tanh": (-1.0, 127 / 128)}
# x * sigmoid(x): TFLite runs it as LOGISTIC (fixed range) then MUL, so it gets two quantizers.
SWISH_ACTIVATIONS = ("swish", "silu")
SWISH_TF_OPS = ("nn.silu", "nn.swish")
# Activations a Conv/Depthwise/Dense int8 kernel applies itself (FoldedConv accepts only these).
FUSABLE_ACTIVATIONS = ("linear", "relu", "relu6")
# Activation layers folded into the op before them ("linear" ones are identity steps instead).
ABSORBED_ACTIVATIONS = ("relu", "relu6")
FUSE_AFTER = (L.Add, L.Subtract, L.Multiply)  # TFLite fuses a following ReLU/ReLU6 into these
ADD_TF_OPS = ("__operators__.add", "math.add")


def activation_name(layer) -> Optional[str]:
    """Names the activation an activation-like layer computes.

    Args:
      layer: any Keras layer.

    Returns:
      'relu', 'relu6', 'linear', ... for ReLU / Activation / nn.relu(6)
      layers, else None (also for a ReLU with a slope, threshold or other cap).
    """
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


def conv_kind(layer) -> Optional[str]:
    """The FoldedConv kind a layer becomes, or None when it cannot be folded.

    Args:
      layer: any Keras layer.

    Returns:
      "conv2d" (plain channels-last Conv2D, one group), "conv1d" (the same
      for Conv1D, run as a CONV_2D over rows: see layers.FoldedConv),
      "depthwise" (channels-last DepthwiseConv2D), "dense" (exactly Dense),
      else None.
    """
    if isinstance(layer, L.DepthwiseConv2D):
        return "depthwise" if layer.data_format == "channels_last" else None
    if isinstance(layer, L.Conv2D) and not isinstance(layer, L.Conv2DTranspose):
        ok = type(layer) in (L.Conv2D,) and layer.groups == 1 and layer.data_format == "channels_last"
        return "conv2d" if ok else None
    if type(layer) is L.Conv1D:
        return "conv1d" if layer.groups == 1 and layer.data_format == "channels_last" else None
    if type(layer) is L.Dense:
        return "dense"
    return None


def is_concat(node) -> bool:
    """Whether a graph node concatenates (its inputs' ranges are tied to its output's)."""
    return isinstance(node.layer, L.Concatenate) or getattr(node.layer, "symbol", None) == "concat"


def pools_one_position(layer) -> bool:
    """A global pooling over a map of one position (InceptionV3's last map at 96x96): a reshape."""
    if not isinstance(layer, (L.GlobalAveragePooling2D, L.GlobalAveragePooling1D, L.GlobalMaxPooling2D,
                              L.GlobalMaxPooling1D)) or isinstance(layer.input_shape, list):
        return False
    shape = layer.input_shape
    pooled = shape[1:-1] if layer.data_format == "channels_last" else shape[2:]
    return all(d == 1 for d in pooled)


def is_same_scale(layer) -> bool:
    """Whether TFLite's int8 kernel for `layer` keeps its input's scale (no quantizer after it)."""
    return isinstance(layer, SAME_SCALE) or (isinstance(layer, L.UpSampling2D) and layer.interpolation == "nearest") \
        or getattr(layer, "symbol", None) in SAME_SCALE_TF_OPS or pools_one_position(layer)


def is_quantized(layer, act: Optional[str]) -> bool:
    """Whether `layer` is an int8 op with its own calibrated output range.

    Args:
      layer: any Keras layer.
      act: its activation name (see `activation_name`; "softmax" for Softmax).
    """
    return isinstance(layer, QUANTIZED) or act in QUANTIZED_ACTIVATIONS \
        or getattr(layer, "symbol", None) in QUANTIZED_TF_OPS


def one_int8_op(layer) -> bool:
    """Whether TFLite runs `layer` as one op with an int8 kernel (Conv/Dense, Add, an activation, a reshape...).

    The converter's fake-quant path quantizes such an op whenever its input and output both carry a range,
    whatever the Keras graph says: a layer the scheme keeps float (schemes.LayerChoices) stays float only
    when its output has no range of its own (build.py).
    """
    act = "softmax" if isinstance(layer, L.Softmax) else activation_name(layer)
    return conv_kind(layer) is not None or is_quantized(layer, act) or is_same_scale(layer) \
        or isinstance(layer, (L.Softmax, L.Activation))


# L2_NORMALIZATION's int8 output: scale 1/128, zero point 0 (TFLite requires it).
L2_NORMALIZATION_RANGE = (-1.0, 127 / 128)
# The widest normalized axis a LayerNormalization is lowered with L2_NORMALIZATION; wider ones with RSQRT
# (norm.py). Measured output SQNR, L2 vs RSQRT form: 24.2 vs 13.8 dB at C = 32, 22.1 vs 19.7 at 512,
# 21.4 vs 21.2 at 768, 21.2 vs 21.3 at 1024, 18.9 vs 22.7 at 2048 (docs/design.md).
LAYERNORM_L2_MAX_CHANNELS = 768


def layernorm_form(channels: int) -> str:
    """"l2" or "rsqrt": how a LayerNormalization over `channels` is lowered (see norm.py)."""
    return "l2" if channels <= LAYERNORM_L2_MAX_CHANNELS else "rsqrt"


def lowers_layernorm(layer) -> bool:
    """A LayerNormalization over the last axis only, of a known width: lowered to int8 ops (norm.py)."""
    if type(layer) is not L.LayerNormalization or isinstance(layer.input_shape, list):
        return False
    shape = layer.input_shape
    axes = layer.axis if isinstance(layer.axis, (list, tuple)) else [layer.axis]
    rank = len(shape)
    return rank >= 2 and len(axes) == 1 and axes[0] % rank == rank - 1 and shape[-1] is not None


# The einsum equations of tf_keras' MultiHeadAttention over axis 1 of rank-3 inputs (attention.py).
ATTENTION_EQUATIONS = ("abc,cde->abde", "abcd,cde->abe", "aecd,abcd->acbe", "acbe,aecd->abcd")
# ... over axis 2 of rank-4 inputs (attention_axes=(2,), MobileViT's patches: axis 1 folds into the batch).
ATTENTION_EQUATIONS_4D = ("abcd,def->abcef", "abcde,def->abcf", "abfde,abcde->abdcf", "abdcf,abfde->abcde")


def lowers_attention(node) -> bool:
    """A MultiHeadAttention call lowered to int8 ops (attention.py): rank-3 inputs of known sizes,
    attention over axis 1 (or rank-4 inputs, attention over axis 2, of one size on axis 1), no mask and
    no returned scores."""
    layer = node.layer
    if type(layer) is not L.MultiHeadAttention or len(node.outputs) != 1:
        return False
    kwargs = node.kwargs
    if kwargs.get("attention_mask") is not None or kwargs.get("use_causal_mask") \
            or kwargs.get("return_attention_scores") or len(node.args) > 3:
        return False
    dense = [layer._query_dense, layer._key_dense, layer._value_dense, layer._output_dense]
    equations = (dense[0].equation, dense[3].equation, layer._dot_product_equation, layer._combine_equation)
    shapes = [getattr(layer, f"_{n}_shape", None) for n in ("query", "key", "value")]
    if any(s is None or None in tuple(s)[1:] for s in shapes):
        return False
    rank = len(shapes[0])
    expected = {3: ATTENTION_EQUATIONS, 4: ATTENTION_EQUATIONS_4D}.get(rank)
    return equations == expected and all(d.equation == expected[0] for d in dense[:3]) \
        and all(len(s) == rank and tuple(s)[1:rank - 2] == tuple(shapes[0])[1:rank - 2] for s in shapes)


def recurrent_problem(node) -> Optional[str]:
    """Why an LSTM/GRU call cannot be lowered to int8 ops (recurrent.py), or None when it can."""
    layer = node.layer
    shape = layer.input_shape
    if isinstance(shape, list) or len(node.inputs) != 1 or node.kwargs.get("mask") is not None \
            or node.kwargs.get("initial_state") is not None or len(node.args) > 1:
        return "it takes an initial state or a mask"
    if shape[1] is None or shape[-1] is None:
        return "its number of time steps is not static (the steps are unrolled)"
    if layer.stateful or layer.go_backwards or layer.return_state:
        return "it is stateful, runs backwards or returns its state"
    cell = layer.cell
    if getattr(cell.activation, "__name__", "") != "tanh" or \
            getattr(cell.recurrent_activation, "__name__", "") != "sigmoid":
        return "its activations are not tanh and sigmoid"
    if type(layer) is L.GRU and not cell.reset_after:
        return "it is a GRU with reset_after=False"
    return None


def is_recurrent(layer) -> bool:
    """A tf_keras LSTM or GRU layer (lowered by recurrent.py when `recurrent_problem` is None)."""
    return type(layer) in (L.LSTM, L.GRU)
