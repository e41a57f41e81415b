"""Bias correction (Nagel et al. 2019, section 4.2): remove the mean output shift of weight quantization.

    shifts = bias_correction.correct_empirical(rewritten, x_calibration)
    shifts = bias_correction.correct_analytic(rewritten, bn_stats)   # data-free

Quantizing W to W~ shifts a layer's pre-activation output by E[(W~ - W) x],
a per-channel constant that accumulates through depthwise networks.  The
empirical correction measures, layer by layer on calibration data, the mean
pre-activation of the quantized layer (on the quantized model's inputs, so
earlier layers' and activation quantization's shifts are corrected too) minus
the float one; the analytic (data-free) one computes E[x] from the
batch-norm statistics of the preceding layer: its pre-activation is N(beta,
gamma^2) per channel, and E[ReLU(z)], E[ReLU6(z)] of a normal z have closed
forms.  The shift is subtracted from the quantized model's bias.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import tensorflow as tf
import tf_keras as keras

from qtoolkit.rewrite.layers import FoldedConv, conv_op


def _convs(model):
    return [layer for layer in model.layers if isinstance(layer, FoldedConv)]


def weight_error(layer: FoldedConv) -> np.ndarray:
    """W~ - W of a FoldedConv (its quantized minus its float kernel)."""
    return (layer.quantized_kernel() - layer.kernel).numpy()


def pre_activation_mean(layer: FoldedConv, x, kernel=None, bias=None) -> np.ndarray:
    """Mean over batch and positions of a FoldedConv's pre-activation output (quantized kernel by default)."""
    kernel = layer.quantized_kernel() if kernel is None else kernel
    bias = layer.bias if bias is None else bias
    y = tf.nn.bias_add(conv_op(layer.kind, tf.convert_to_tensor(x), kernel, layer.strides, layer.padding,
                               layer.dilation_rate), bias)
    return tf.reduce_mean(tf.reshape(y, (-1, layer.units)), axis=0).numpy().astype(np.float64)


def correct_empirical(rewritten, inputs, batch_size: int = 64, quantized_inputs: bool = True) -> dict[str, np.ndarray]:
    """Makes every quantized FoldedConv's mean pre-activation on the calibration data equal the float one.

    Layer by layer in graph order: with `quantized_inputs` (default) the
    layer's input comes from the quantized model, with the layers before it
    already corrected, so the correction also removes the mean shift that
    activation quantization and earlier layers leave (AIMET's empirical bias
    correction); otherwise from the float model, which corrects only the
    layer's own weight error E[(W~ - W) x] (the paper's definition).

    Args:
      rewritten: rewrite.Rewritten (weights final: after CLE / AdaRound; activation ranges calibrated
        when `quantized_inputs`).
      inputs: calibration inputs, one array per model input.

    Returns:
      layer name -> the shift removed from its bias.
    """
    twin, qmodel = rewritten.float_model, rewritten.model
    shifts = {}
    n = inputs[0].shape[0]
    for layer in _convs(qmodel):
        if layer.weight_quantizer is None:
            continue
        float_layer = twin.get_layer(layer.name)
        float_in = keras.Model(twin.inputs, float_layer.input)
        quant_in = keras.Model(qmodel.inputs, layer.input) if quantized_inputs else float_in
        total = np.zeros(layer.units)
        for start in range(0, n, batch_size):
            batch = [a[start:start + batch_size] for a in inputs]
            feed = batch if len(batch) > 1 else batch[0]
            total += (pre_activation_mean(layer, quant_in(feed, training=False))
                      - pre_activation_mean(layer, float_in(feed, training=False), float_layer.kernel,
                                            float_layer.bias)) * batch[0].shape[0]
        shift = (total / n).astype(np.float32)
        layer.bias.assign(layer.bias.numpy() - shift)
        shifts[layer.name] = shift
    return shifts


def relu_mean(mu: np.ndarray, sigma: np.ndarray, clip: Optional[float] = None) -> np.ndarray:
    """E[min(max(z, 0), clip)] for z ~ N(mu, sigma^2), per channel."""
    def e_relu(m):
        sigma_ = np.maximum(sigma, 1e-12)
        t = m / sigma_
        cdf = 0.5 * (1 + np.vectorize(math.erf)(t / math.sqrt(2)))
        pdf = np.exp(-0.5 * t * t) / math.sqrt(2 * math.pi)
        return m * cdf + sigma_ * pdf
    out = e_relu(mu)
    if clip is not None:
        out = out - e_relu(mu - clip)  # min(relu(z), c) = relu(z) - relu(z - c)
    return out


def constant_response(kind: str, kernel: np.ndarray, c: np.ndarray) -> np.ndarray:
    """What a FoldedConv kernel adds to each output for the constant input c (per input channel), no padding."""
    if kind == "dense":
        return c @ kernel
    if kind == "depthwise":
        return (kernel.sum(axis=(0, 1)) * c[:, None]).reshape(-1)
    return np.einsum("hwio,i->o", kernel, c)


def expected_input(twin: keras.Model, layer_name: str, stats: dict) -> Optional[np.ndarray]:
    """E[input] of a FoldedConv from the batch-norm statistics of the FoldedConv before it.

    Walks back through layers that keep the per-channel mean (global average
    pooling, padding is ignored); None when the producer has no statistics.
    """
    current = twin.get_layer(layer_name)
    while True:
        nodes = current.inbound_nodes
        if len(nodes) != 1 or not isinstance(nodes[0].inbound_layers, keras.layers.Layer):
            return None
        prev = nodes[0].inbound_layers
        if isinstance(prev, FoldedConv):
            break
        if not isinstance(prev, (keras.layers.GlobalAveragePooling2D, keras.layers.ZeroPadding2D)):
            return None
        current = prev
    if prev.name not in stats:
        return None
    mu, sigma = stats[prev.name]
    if prev.activation == "linear":
        return mu
    return relu_mean(mu, sigma, 6.0 if prev.activation == "relu6" else None)


def correct_analytic(rewritten, stats: dict) -> dict[str, np.ndarray]:
    """Data-free correction: E[x] from batch-norm statistics (see `expected_input`).

    Args:
      rewritten: rewrite.Rewritten.
      stats: FoldedConv name -> (mean, std) of its pre-activation output per
        channel (beta and |gamma| of its folded batch norm, after CLE scaling).

    Returns:
      layer name -> the shift removed (layers without statistics are skipped).
    """
    twin, qmodel = rewritten.float_model, rewritten.model
    shifts = {}
    for layer in _convs(qmodel):
        if layer.weight_quantizer is None:
            continue
        ex = expected_input(twin, layer.name, stats)
        if ex is None:
            continue
        shift = constant_response(layer.kind, weight_error(layer), ex).astype(np.float32)
        layer.bias.assign(layer.bias.numpy() - shift)
        shifts[layer.name] = shift
    return shifts


def batch_norm_stats(model: keras.Model, rewritten, cle_scales: Optional[dict] = None) -> dict:
    """FoldedConv name -> (beta, |gamma|) of the batch norm folded into it, divided by its CLE scale.

    Reads the original model's batch norms via `rewritten.folded` ("conv+bn+relu").
    """
    from qtoolkit.rewrite.graph import flatten

    layers = {node.name: node.layer for node in flatten(model).nodes}
    stats = {}
    for line in rewritten.folded:
        parts = line.split("+")
        bns = [layers.get(p) for p in parts[1:] if isinstance(layers.get(p), keras.layers.BatchNormalization)]
        if not bns:
            continue
        bn = bns[0]
        weights = {w.name.split("/")[-1].split(":")[0]: w.numpy() for w in bn.weights}
        beta = weights.get("beta", np.zeros_like(weights["moving_mean"]))
        gamma = weights.get("gamma", np.ones_like(weights["moving_mean"]))
        s = (cle_scales or {}).get(parts[0], 1.0)
        stats[parts[0]] = (beta / s, np.abs(gamma) / s)
    return stats
