"""A layer as a matrix product over rows: one row per output position (its receptive field).

    rows, targets, per_sample = layer_rows("conv2d", kernel.shape, x, y, conv_args, rng)
    out = forward(rows, kernel_matrix("conv2d", kernel), "matmul")   # == conv(x, kernel) at those rows

A convolution's output at one position depends only on the input patch under
the kernel there, so AdaRound's reconstruction loss (a mean over samples and
positions) can be estimated on any set of positions: a step then costs what
its rows cost, whatever the image size, and rows drawn over all samples and
positions vary more than the same number taken from a few whole images.
Conv2D and Conv1D become a matrix product (patch @ kernel as [kh*kw*cin,
cout]), depthwise a per-channel one (patch [kh*kw, c] against the kernel's
[kh*kw, c, m]), Dense is already one.  The row pool of a layer holds at most
`POOL_BYTES` of patches, the same number of positions from every sample.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from qtoolkit.rewrite.layers import conv2d_args, to_rows

POOL_BYTES = 64 << 20  # patches held per layer (float32); positions beyond it are sampled
CHUNK_BYTES = 32 << 20  # patches extracted at once


def kernel_matrix(kind: str, kernel: np.ndarray) -> np.ndarray:
    """A kernel-shaped array in row form: [k, cout] (conv2d, conv1d, dense) or [k, c, m] (depthwise)."""
    if kind == "depthwise":
        kh, kw, c, m = kernel.shape
        return kernel.reshape(kh * kw, c, m)
    return kernel.reshape(-1, kernel.shape[-1])


def kernel_array(kind: str, matrix: np.ndarray, shape) -> np.ndarray:
    """The inverse of `kernel_matrix`."""
    return np.asarray(matrix).reshape(shape)


def form(kind: str, kernel_shape) -> str:
    """How `forward` computes a kind: "matmul", "depthwise" (multiplier 1) or "depthwise_multiplier"."""
    if kind != "depthwise":
        return "matmul"
    return "depthwise" if kernel_shape[-1] == 1 else "depthwise_multiplier"


def forward(rows, kernel, form_: str):
    """The layer's linear output at the rows, [rows, cout], for a `form`."""
    if form_ == "matmul":
        return tf.matmul(rows, kernel)
    if form_ == "depthwise":
        return tf.reduce_sum(rows * kernel[..., 0], axis=1)
    out = tf.einsum("rkc,kcm->rcm", rows, kernel)
    return tf.reshape(out, [tf.shape(out)[0], -1])


def layer_rows(kind: str, kernel_shape, x, y, conv_args: dict, rng: np.random.Generator, pool_bytes=POOL_BYTES):
    """The rows (inputs) and targets (float outputs) of a layer's output positions.

    Args:
      kind: "conv2d", "conv1d", "depthwise" or "dense".
      kernel_shape: the layer's kernel shape.
      x: the layer's input, [N, ...].
      y: the target output at every position, [N, ..., cout].
      conv_args: strides, padding, dilation_rate (conv kinds).
      rng: draws the positions kept when the pool would exceed `pool_bytes`.

    Returns:
      (rows [R, k] or [R, kh*kw, c] for depthwise, targets [R, cout], output positions per sample).
    """
    x, y = tf.convert_to_tensor(x, tf.float32), tf.convert_to_tensor(y, tf.float32)
    n = int(x.shape[0])
    if kind == "dense":
        rows, targets = tf.reshape(x, [-1, x.shape[-1]]), tf.reshape(y, [-1, y.shape[-1]])
        return rows, targets, int(rows.shape[0]) // n
    if kind == "conv1d":
        strides, padding, dilation = conv2d_args(kind, kernel_shape, conv_args["strides"], conv_args["padding"],
                                                 conv_args["dilation_rate"])
        x, y = to_rows(x), to_rows(y)
    else:
        strides, padding, dilation = (conv_args["strides"], conv_args["padding"].upper(),
                                      conv_args["dilation_rate"])
    if not isinstance(padding, str):  # conv1d's causal padding: explicit
        x, padding = tf.pad(x, padding), "VALID"
    kh, kw = kernel_shape[:2]
    positions = int(y.shape[1]) * int(y.shape[2])
    width = kh * kw * int(x.shape[-1])
    keep = min(positions, max(1, pool_bytes // (4 * width * n)))  # positions per sample
    step = max(1, CHUNK_BYTES // (4 * width * positions))
    rows, targets = [], []
    for start in range(0, n, step):
        xs, ys = x[start:start + step], y[start:start + step]
        if (kh, kw) == (1, 1) and tuple(strides) == (1, 1):
            patches = xs
        else:
            patches = tf.image.extract_patches(xs, [1, kh, kw, 1], [1, *strides, 1], [1, *dilation, 1], padding)
        patches = tf.reshape(patches, [-1, positions, width])
        ys = tf.reshape(ys, [-1, positions, ys.shape[-1]])
        if keep < positions:
            idx = np.argsort(rng.random((patches.shape[0], positions)), axis=1)[:, :keep]
            patches, ys = tf.gather(patches, idx, batch_dims=1), tf.gather(ys, idx, batch_dims=1)
        rows.append(tf.reshape(patches, [-1, width]))
        targets.append(tf.reshape(ys, [-1, ys.shape[-1]]))
    rows, targets = tf.concat(rows, 0), tf.concat(targets, 0)
    if kind == "depthwise":
        rows = tf.reshape(rows, [-1, kh * kw, int(x.shape[-1])])
    return rows, targets, positions
