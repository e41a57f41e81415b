"""Small models of every shape a user brings, trained in seconds on digits: for tests and the coverage table.

    from qtoolkit.zoo import shapes
    model, data = shapes.trained("unet")          # a tf_keras model and its Task data
    data.x_test, data.y_test                      # inputs (list per model input), labels per output

Each builder makes a tf_keras model (`k=keras` for Keras 3 where the builder allows): two inputs and two
outputs of equal shape (`two_heads`), a U-Net with a per-pixel softmax (`unet`), a subclassed model
(`subclassed`), a model with a user's own layer class (`custom_layer`, class `ChannelScale`), a Conv1D
network with batch norm (`conv1d_bn`) and a detection-style head with box regression and per-anchor
class logits (`detection`).  Inputs are sklearn's digits, upsampled to 16x16 (32x32 canvases for
detection).  `scripts/coverage.py` converts each with qtoolkit and the converter (docs/coverage.md).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np
import tf_keras

from qtoolkit import datasets

NAMES = ("two_heads", "unet", "subclassed", "custom_layer", "conv1d_bn", "detection")
_GRID = 4  # detection: a 4x4 grid of anchors over a 32x32 canvas


@dataclasses.dataclass(frozen=True)
class Task:
    """A model's data: inputs per model input, targets per output, and each output's task.

    Attributes:
      x_train, x_test: one array per model input.
      y_train, y_test: one array per model output (class ids for "classification", values for "regression").
      tasks: per output, "classification" (class logits or probabilities on the last axis) or "regression".
    """

    x_train: list
    y_train: list
    x_test: list
    y_test: list
    tasks: tuple


def _images(size: int = 16):
    (x, y), (xt, yt) = datasets.load("digits")
    up = size // 8
    grow = lambda a: np.kron(a, np.ones((1, up, up, 1), np.float32)).astype(np.float32)  # noqa: E731
    return grow(x), y.astype(np.int64), grow(xt), yt.astype(np.int64)


def _conv_bn(L, x, filters, name, kernel=3, strides=1):
    x = L.Conv2D(filters, kernel, strides, padding="same", use_bias=False, name=f"{name}_conv")(x)
    x = L.BatchNormalization(momentum=0.9, name=f"{name}_bn")(x)
    return L.ReLU(name=f"{name}_relu")(x)


def two_heads(k=tf_keras):
    L = k.layers
    image, meta = k.Input((16, 16, 1), name="image"), k.Input((4,), name="meta")
    x = _conv_bn(L, image, 16, "c1")
    x = L.MaxPooling2D(name="pool")(x)
    x = _conv_bn(L, x, 32, "c2")
    x = L.GlobalAveragePooling2D(name="gap")(x)
    m = L.Dense(16, activation="relu", name="meta_fc")(meta)
    x = L.Concatenate(name="join")([x, m])
    digit = L.Dense(10, name="digit")(x)
    mirror = L.Dense(10, name="mirror")(x)  # the same shape as "digit": swapped heads must be caught
    return k.Model([image, meta], [digit, mirror], name="two_heads")


def unet(k=tf_keras):
    L = k.layers
    inp = k.Input((16, 16, 1), name="image")
    d1 = _conv_bn(L, inp, 16, "d1")
    d2 = _conv_bn(L, L.MaxPooling2D(name="p1")(d1), 32, "d2")
    b = _conv_bn(L, L.MaxPooling2D(name="p2")(d2), 32, "mid")
    u2 = L.Conv2DTranspose(32, 2, 2, name="up2")(b)
    u2 = _conv_bn(L, L.Concatenate(name="skip2")([u2, d2]), 32, "u2")
    u1 = L.Conv2DTranspose(16, 2, 2, name="up1")(u2)
    u1 = _conv_bn(L, L.Concatenate(name="skip1")([u1, d1]), 16, "u1")
    out = L.Conv2D(3, 1, activation="softmax", name="mask")(u1)
    return k.Model(inp, out, name="unet")


class _Subclassed(tf_keras.Model):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        L = tf_keras.layers
        self.conv1 = L.Conv2D(16, 3, padding="same", use_bias=False)
        self.bn1 = L.BatchNormalization(momentum=0.9)
        self.pool = L.MaxPooling2D()
        self.conv2 = L.Conv2D(32, 3, padding="same", activation="relu")
        self.gap = L.GlobalAveragePooling2D()
        self.head = L.Dense(10)

    def call(self, x, training=None):
        x = tf_keras.activations.relu(self.bn1(self.conv1(x), training=training))
        return self.head(self.gap(self.conv2(self.pool(x))))


def subclassed(k=tf_keras):
    if k is not tf_keras:
        raise ValueError("the subclassed model is written for tf_keras")
    model = _Subclassed(name="subclassed")
    model.build((None, 16, 16, 1))
    return model


class ChannelScale(tf_keras.layers.Layer):
    """A user's own layer (not registered with Keras): a learned per-channel scale."""

    def build(self, input_shape):
        self.gamma = self.add_weight("gamma", (int(input_shape[-1]),), initializer="ones")

    def call(self, x):
        return x * self.gamma


def custom_layer(k=tf_keras):
    if k is not tf_keras:
        raise ValueError("the custom-layer model is written for tf_keras")
    L = k.layers
    inp = k.Input((16, 16, 1), name="image")
    x = L.Conv2D(16, 3, padding="same", activation="relu", name="c1")(inp)
    x = ChannelScale(name="scale")(x)
    x = L.Conv2D(32, 3, strides=2, padding="same", activation="relu", name="c2")(x)
    x = L.GlobalAveragePooling2D(name="gap")(x)
    return k.Model(inp, L.Dense(10, name="head")(x), name="custom_layer")


def conv1d_bn(k=tf_keras):
    L = k.layers
    inp = k.Input((64, 4), name="sequence")
    x = inp
    for i, filters in enumerate((16, 32, 32)):
        x = L.Conv1D(filters, 5, padding="same", use_bias=False, name=f"conv{i + 1}")(x)
        x = L.BatchNormalization(momentum=0.9, name=f"bn{i + 1}")(x)
        x = L.ReLU(name=f"relu{i + 1}")(x)
    x = L.GlobalAveragePooling1D(name="gap")(x)
    return k.Model(inp, L.Dense(10, name="head")(x), name="conv1d_bn")


def detection(k=tf_keras):
    L = k.layers
    inp = k.Input((32, 32, 1), name="canvas")
    x = _conv_bn(L, inp, 16, "s1", strides=2)
    x = _conv_bn(L, x, 32, "s2", strides=2)
    x = _conv_bn(L, x, 32, "s3", strides=2)  # 4x4: one anchor per cell
    boxes = L.Reshape((_GRID * _GRID, 4), name="boxes")(L.Conv2D(4, 1, name="box_conv")(x))
    classes = L.Reshape((_GRID * _GRID, 3), name="classes")(L.Conv2D(3, 1, name="cls_conv")(x))
    return k.Model(inp, [boxes, classes], name="detection")


def _canvas(images, labels, seed):
    """Each 16x16 digit at a random place on a 32x32 canvas; per anchor: box offsets and class."""
    rng = np.random.default_rng(seed)
    n = images.shape[0]
    canvas = np.zeros((n, 32, 32, 1), np.float32)
    boxes = np.zeros((n, _GRID * _GRID, 4), np.float32)
    classes = np.zeros((n, _GRID * _GRID), np.int64)
    centres = (np.arange(_GRID) + 0.5) / _GRID
    for i in range(n):
        top, left = rng.integers(0, 17, 2)
        canvas[i, top:top + 16, left:left + 16] = images[i]
        cy, cx = (top + 8) / 32, (left + 8) / 32
        gy, gx = np.meshgrid(centres, centres, indexing="ij")
        boxes[i] = np.stack([(cy - gy).ravel(), (cx - gx).ravel(), np.full(16, 0.5), np.full(16, 0.5)], 1)
        classes[i, int(cy * _GRID) * _GRID + int(cx * _GRID)] = 1 + labels[i] % 2
    return canvas, boxes, classes


def data(name: str) -> Task:
    """The inputs and targets `name` trains and is evaluated on."""
    x, y, xt, yt = _images()
    c = lambda a: a.astype(np.float32)  # noqa: E731
    if name == "two_heads":
        meta = lambda a: c(np.stack([a.mean((1, 2, 3)), a.std((1, 2, 3)), a[:, :8].mean((1, 2, 3)),  # noqa: E731
                                     a[:, :, :8].mean((1, 2, 3))], 1))
        return Task([x, meta(x)], [y, 9 - y], [xt, meta(xt)], [yt, 9 - yt], ("classification",) * 2)
    if name == "unet":
        mask = lambda a, lab: np.where(a[..., 0] > 0.3, 1 + (lab % 2)[:, None, None], 0)  # noqa: E731
        return Task([x], [mask(x, y)], [xt], [mask(xt, yt)], ("classification",))
    if name == "conv1d_bn":
        seq = lambda a: a.reshape(a.shape[0], 64, 4)  # noqa: E731
        return Task([seq(x)], [y], [seq(xt)], [yt], ("classification",))
    if name == "detection":
        cx, bx, kx = _canvas(x, y, 0)
        ct, bt, kt = _canvas(xt, yt, 1)
        return Task([cx], [bx, kx], [ct], [bt, kt], ("regression", "classification"))
    if name in ("subclassed", "custom_layer"):
        return Task([x], [y], [xt], [yt], ("classification",))
    raise ValueError(f"unknown model shape {name!r}; known: {', '.join(NAMES)}")


def vit_block(k=tf_keras):
    """A ViT-style block on 16x16 digits (issue 20's): patch embedding into 16 tokens of 32 channels,
    pre-norm attention and GELU MLP blocks with residual adds, pooled head (tests/test_transformer.py,
    scripts/bench_transformers.py)."""
    L = k.layers
    inp = k.Input((16, 16, 1), name="image")
    x = L.Conv2D(32, 4, strides=4, name="patch")(inp)
    x = L.Reshape((16, 32), name="tokens")(x)
    h = L.LayerNormalization(name="ln1")(x)
    x = L.Add(name="add1")([x, L.MultiHeadAttention(num_heads=2, key_dim=16, name="mha")(h, h)])
    h = L.LayerNormalization(name="ln2")(x)
    h = L.Dense(32, name="fc2")(L.Dense(64, activation="gelu", name="fc1")(h))
    x = L.Add(name="add2")([x, h])
    x = L.GlobalAveragePooling1D(name="gap")(L.LayerNormalization(name="ln3")(x))
    return k.Model(inp, L.Dense(10, name="head")(x), name="vit_block")


def mobilevit_block(k=tf_keras):
    """A MobileViT-style hybrid on 16x16 digits: a strided conv stem (8x8), a MobileNetV2 inverted
    residual block, then a MobileViT block: local 3x3 and 1x1 convs, 2x2 patches unfolded into 4 sequences
    (one per position in the patch) of 16 tokens, a pre-norm transformer over each (MultiHeadAttention
    over axis 2, GELU MLP), folded back, a 1x1 projection concatenated with the block's input and a 3x3
    fusion conv; pooled head (tests/test_transformer.py, scripts/bench_transformers.py)."""
    L = k.layers
    inp = k.Input((16, 16, 1), name="image")
    x = _conv_bn(L, inp, 16, "stem", strides=2)
    h = _conv_bn(L, x, 32, "expand", kernel=1)
    h = L.ReLU(6.0, name="dw_relu")(L.BatchNormalization(momentum=0.9, name="dw_bn")(
        L.DepthwiseConv2D(3, padding="same", use_bias=False, name="dw")(h)))
    h = L.BatchNormalization(momentum=0.9, name="project_bn")(L.Conv2D(16, 1, use_bias=False, name="project")(h))
    x = L.Add(name="residual")([x, h])
    y = L.Conv2D(16, 3, padding="same", activation="relu", name="local")(x)
    y = L.Conv2D(32, 1, name="to_tokens")(y)
    y = L.Reshape((4, 2, 4, 2, 32), name="patches")(y)  # (patch row, row in patch, patch col, col in patch)
    y = L.Reshape((4, 16, 32), name="unfold")(L.Permute((2, 4, 1, 3, 5), name="unfold_order")(y))
    h = L.LayerNormalization(name="ln1")(y)
    y = L.Add(name="add1")([y, L.MultiHeadAttention(2, 16, attention_axes=(2,), name="mha")(h, h)])
    h = L.LayerNormalization(name="ln2")(y)
    y = L.Add(name="add2")([y, L.Dense(32, name="fc2")(L.Dense(64, activation="gelu", name="fc1")(h))])
    y = L.Reshape((2, 2, 4, 4, 32), name="fold")(L.LayerNormalization(name="ln3")(y))
    y = L.Reshape((8, 8, 32), name="feature_map")(L.Permute((3, 1, 4, 2, 5), name="fold_order")(y))
    y = L.Conv2D(16, 1, activation="relu", name="from_tokens")(y)
    y = L.Conv2D(32, 3, padding="same", activation="relu", name="fusion")(L.Concatenate(name="join")([x, y]))
    y = L.GlobalAveragePooling2D(name="gap")(y)
    return k.Model(inp, L.Dense(10, name="head")(y), name="mobilevit_block")


BUILDERS: dict[str, Callable] = {"two_heads": two_heads, "unet": unet, "subclassed": subclassed,
                                 "custom_layer": custom_layer, "conv1d_bn": conv1d_bn, "detection": detection}
_TRAINED: dict = {}


def trained(name: str, epochs: int = 2, seed: int = 0):
    """(model, Task): `name` built and trained for `epochs` on its data (trained once per process)."""
    task = data(name)
    model = BUILDERS[name]()
    if (name, epochs, seed) in _TRAINED:
        model.set_weights(_TRAINED[(name, epochs, seed)])
        return model, task
    tf_keras.utils.set_random_seed(seed)
    model = BUILDERS[name]()
    ce = tf_keras.losses.SparseCategoricalCrossentropy(from_logits=name != "unet")
    losses = [ce if t == "classification" else tf_keras.losses.MeanSquaredError() for t in task.tasks]
    model.compile(tf_keras.optimizers.Adam(3e-3), losses if len(losses) > 1 else losses[0])
    x = task.x_train if len(task.x_train) > 1 else task.x_train[0]
    y = task.y_train if len(task.y_train) > 1 else task.y_train[0]
    model.fit(x, y, batch_size=32, epochs=epochs, verbose=0)
    _TRAINED[(name, epochs, seed)] = model.get_weights()
    return model, task
