"""Folding maths: batch norm and other per-channel affine maps into weights.

This module owns the numbers, not the graph: the (scale, offset) an
inference-mode batch norm, Rescaling, Normalization or `x + c` constant
applies per channel, a conv's kernel and bias, and `fold`, which multiplies
those into the kernel and bias that the int8 model stores.

    scale, offset = affine_params(bn)                   # y = x * scale + offset
    kernel, bias = fold(conv, [bn], pre_affine=None)    # conv then bn, as one conv
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import tf_keras as keras

from qtoolkit.rewrite import graph as g
from qtoolkit.rewrite.ops import ADD_TF_OPS

L = keras.layers


def bn_weights(bn) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(gamma, beta, moving mean, moving variance) of a batch norm; gamma/beta default to 1/0."""
    weights = {w.name.split("/")[-1].split(":")[0]: w.numpy() for w in bn.weights}
    var, mean = weights["moving_variance"], weights["moving_mean"]
    return weights.get("gamma", np.ones_like(var)), weights.get("beta", np.zeros_like(var)), mean, var


def bn_params(bn) -> tuple[np.ndarray, np.ndarray]:
    """(scale, offset) of an inference-mode batch norm: y = x * scale + offset."""
    gamma, beta, mean, var = bn_weights(bn)
    scale = gamma / np.sqrt(var + bn.epsilon)
    return scale.astype(np.float32), (beta - mean * scale).astype(np.float32)


def affine_params(layer) -> Optional[tuple[np.ndarray, np.ndarray]]:
    """Per-channel (scale, offset) of BatchNormalization / Rescaling / Normalization, or None."""
    if isinstance(layer, L.BatchNormalization):
        return bn_params(layer)
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


def is_channel_last_bn(bn, rank: int) -> bool:
    """Whether a batch norm of an input of `rank` normalizes the last axis only (and does not renormalize)."""
    axis = bn.axis if isinstance(bn.axis, (list, tuple)) else [bn.axis]
    return len(axis) == 1 and axis[0] in (-1, rank - 1) and not getattr(bn, "renorm", False)


def is_affine(layer) -> bool:
    """A per-channel affine layer the rewriter turns into a 1x1 depthwise conv."""
    return (isinstance(layer, L.BatchNormalization) and is_channel_last_bn(layer, len(layer.input_shape))) \
        or (isinstance(layer, (L.Rescaling, L.Normalization)) and affine_params(layer) is not None)


def _constants(node: g.Node) -> list:
    """The non-tensor, non-None call arguments of a TFOpLambda node (its `name` excluded)."""
    return [a for a in (*node.args, *(v for k, v in node.kwargs.items() if k != "name"))
            if not isinstance(a, g.TensorRef) and a is not None]


def constant_add(node: g.Node) -> Optional[tuple[np.ndarray, np.ndarray]]:
    """(scale 1, offset c) per channel when `node` is tensor + constant (a TFOpLambda), else None.

    MobileNetV3's hard sigmoid is relu6(x + 3) / 6: TFLite's int8 ADD of the
    constant 3 leaves XNNPACK when the input's scale is far below the output's
    (scale ratio under 2^-10), and the converter's PTQ fuses the pattern into
    HARD_SWISH, which XNNPACK has no int8 kernel for.  As a 1x1 depthwise conv
    (weight 1, bias c, ReLU6 fused) it is one int8 op XNNPACK always takes.
    """
    if getattr(node.layer, "symbol", None) not in ADD_TF_OPS or len(node.inputs) != 1 or len(node.outputs) != 1:
        return None
    consts = _constants(node)
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


def constant_multiply(node: g.Node) -> Optional[float]:
    """k when `node` is tensor * scalar constant k (a TFOpLambda), else None."""
    if getattr(node.layer, "symbol", None) != "math.multiply" or len(node.inputs) != 1 or len(node.outputs) != 1:
        return None
    consts = _constants(node)
    if len(consts) != 1 or np.size(consts[0]) != 1:
        return None
    try:
        return float(np.asarray(consts[0], np.float32).reshape(()))
    except (TypeError, ValueError):
        return None


def kernel_and_bias(layer) -> tuple[np.ndarray, np.ndarray]:
    """A Conv2D / Conv1D / DepthwiseConv2D / Dense layer's kernel and bias (zeros without one).

    A Conv1D kernel (k, in, out) comes as the (1, k, in, out) kernel of the
    CONV_2D over rows that runs it (see layers.FoldedConv).
    """
    depthwise = isinstance(layer, L.DepthwiseConv2D)
    kernel = (layer.depthwise_kernel if depthwise else layer.kernel).numpy()
    if isinstance(layer, L.Conv1D):
        kernel = kernel[None]
    units = kernel.shape[2] * kernel.shape[3] if depthwise else kernel.shape[-1]
    return kernel, layer.bias.numpy() if layer.use_bias else np.zeros(units, np.float32)


def fold(layer, absorbed=(), pre_affine: Optional[tuple] = None) -> tuple[np.ndarray, np.ndarray]:
    """Kernel and bias of a conv/dense layer with the affine maps around it folded in.

    Args:
      layer: a Conv2D / Conv1D / DepthwiseConv2D / Dense layer.
      absorbed: the layers fused after it, in order; its batch norms are folded
        (others, such as a ReLU, do not change the weights).
      pre_affine: (scale, offset) per input channel applied before the layer,
        or None.

    Returns:
      (kernel, bias) as float32.
    """
    kernel, bias = kernel_and_bias(layer)
    if pre_affine is not None:
        scale, offset = pre_affine
        if isinstance(layer, L.DepthwiseConv2D):
            bias = bias + (kernel.sum(axis=(0, 1)) * offset[:, None]).reshape(-1)
        else:
            bias = bias + np.einsum("hwio,i->o", kernel, offset)
        kernel = kernel * scale[None, None, :, None]
    for extra in absorbed:
        if isinstance(extra, L.BatchNormalization):
            scale, offset = bn_params(extra)
            if isinstance(layer, L.DepthwiseConv2D):
                kernel = kernel * scale.reshape(kernel.shape[2], kernel.shape[3])
            else:
                kernel = kernel * scale
            bias = bias * scale + offset
    return kernel.astype(np.float32), bias.astype(np.float32)


def layernorm_affine(layer, normalized_scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """(gamma * normalized_scale, beta) of a LayerNormalization (gamma 1 / beta 0 when it does not scale / center).

    The L2_NORMALIZATION form of the lowering (norm.py) computes (x - mean) / sqrt(C (var + eps)): its
    affine is gamma * sqrt(C) (normalized_scale = sqrt(C)) and beta.
    """
    channels = int(layer.input_shape[-1])
    gamma = layer.gamma.numpy() if layer.scale else np.ones(channels, np.float32)
    beta = layer.beta.numpy() if layer.center else np.zeros(channels, np.float32)
    return (gamma * normalized_scale).astype(np.float32), beta.astype(np.float32)
