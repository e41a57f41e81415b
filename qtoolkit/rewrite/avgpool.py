"""Average-pooling emulation: AveragePooling2D as ops XNNPACK runs in int8.

XNNPACK has no int8 average pooling, so the rewriter runs one as a depthwise
conv with weights 1/count, or, on a small map with uneven 'same' counts, as
one FULLY_CONNECTED over the positions.  This module owns when that applies
and the constants it needs: the count-correction map and the position matrix.

    if avgpool_as_depthwise(layer):
        correction = avgpool_correction(layer)   # (1, H, W, 1) window / count
        matrix = avgpool_matrix(layer)           # (H*W, Ho*Wo) linear map
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf
import tf_keras as keras

L = keras.layers

# An average pooling's window and output share one range when at least this fraction of
# positions has the full count (the MUL by the count map is then exact there).
TIE_FULL_FRACTION = 0.5
# A 'same' average pooling with uneven counts over a map of at most this many positions runs
# as one FULLY_CONNECTED over the positions (weights 1/count: one rounding, like TFLite's
# AVERAGE_POOL_2D); larger maps use a depthwise conv and a count-map MUL (the matrix grows
# with the square of the positions).
SMALL_MAP_POSITIONS = 100


def avgpool_as_depthwise(layer) -> bool:
    """An AveragePooling2D the rewriter runs as a depthwise conv (XNNPACK has no int8 average pooling)."""
    shape = layer.input_shape if isinstance(layer, L.AveragePooling2D) else None
    return shape is not None and not isinstance(shape, list) and layer.data_format == "channels_last" \
        and all(d is not None for d in shape[1:])


def avgpool_correction(layer) -> np.ndarray:
    """(1, H, W, 1): window size / valid elements per output position ('same' padding excludes the pad)."""
    _, h, w, _ = layer.input_shape
    ones = tf.ones((1, h, w, 1))
    counts = tf.nn.conv2d(ones, tf.ones((*layer.pool_size, 1, 1)), layer.strides, layer.padding.upper())
    return (float(np.prod(layer.pool_size)) / counts.numpy()).astype(np.float32)


def avgpool_matrix(layer) -> np.ndarray:
    """(H*W, Ho*Wo): the average pooling as a linear map over positions (column p: 1/count_p on its window)."""
    _, h, w, _ = layer.input_shape
    one_hot = tf.reshape(tf.eye(h * w), (h * w, h, w, 1))
    pooled = tf.nn.avg_pool2d(one_hot, layer.pool_size, layer.strides, layer.padding.upper())
    return pooled.numpy().reshape(h * w, -1).astype(np.float32)
