"""Reference models of the kinds the paper studies, small enough to train here.

Three architectures — MobileNet-v1-style (depthwise separable, BN, ReLU6),
MobileNet-v2-style (inverted residuals, linear bottlenecks) and ResNet-style
(basic residual blocks) — trained on Fashion-MNIST and on scikit-learn's
digits by `scripts/train_reference.py` with fixed seeds. One more,
`mobilenet_v1_dead_fmnist`, is the MobileNet-v1-style model trained as the
ImageNet MobileNets' per-tensor failure needs: batch norm with PyTorch's
epsilon (1e-5) and a 10x learning rate leave dead channels (batch variance
~1e-12), whose folded depthwise kernels are hundreds of times wider than the
live channels' (docs/algorithms.md: what cross-layer equalization is for). The trained weights
are committed in `qtoolkit/zoo/weights/` (a few hundred KB), so the
regression job and the paper reproduction never retrain:

    from qtoolkit import zoo
    model = zoo.load("mobilenet_v1_fmnist")        # a trained tf_keras model
    zoo.REFERENCE["mobilenet_v1_fmnist"].dataset   # "fashion_mnist"
    zoo.manifest()["mobilenet_v1_fmnist"]          # test accuracy, epochs, seed, ...

Data licenses: Fashion-MNIST is MIT-licensed (Zalando Research); scikit-learn's
digits are BSD-3-Clause (a copy of the UCI optdigits test set, CC BY 4.0).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Callable

import tf_keras as keras

from qtoolkit import datasets
from qtoolkit.errors import ReferenceUnavailable  # noqa: F401  (raised here; defined with the others)

L = keras.layers
WEIGHTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights")
MANIFEST = os.path.join(WEIGHTS_DIR, "manifest.json")


def _conv_bn(x, filters, kernel, stride, name, activation="relu6", depthwise=False, epsilon=1e-3, k=keras):
    L = k.layers
    if depthwise:
        x = L.DepthwiseConv2D(kernel, strides=stride, padding="same", use_bias=False, name=name)(x)
    else:
        x = L.Conv2D(filters, kernel, strides=stride, padding="same", use_bias=False, name=name)(x)
    x = L.BatchNormalization(epsilon=epsilon, name=f"{name}_bn")(x)
    if activation == "relu6":
        x = L.ReLU(6.0, name=f"{name}_relu6")(x)
    elif activation == "relu":
        x = L.ReLU(name=f"{name}_relu")(x)
    return x


def mobilenet_v1_small(input_shape=(28, 28, 1), classes=10, width=32, name="mobilenet_v1_small", bn_epsilon=1e-3,
                       k=keras):
    """Conv-BN-ReLU6 stem, four depthwise-separable blocks (BN, ReLU6), GAP, dense (`k`: tf_keras or keras)."""
    L = k.layers
    inp = k.Input(input_shape, name="image")
    x = _conv_bn(inp, width, 3, 1, "stem", epsilon=bn_epsilon, k=k)
    for i, (filters, stride) in enumerate([(width * 2, 2), (width * 2, 1), (width * 4, 2), (width * 4, 1)]):
        x = _conv_bn(x, None, 3, stride, f"dw{i}", depthwise=True, epsilon=bn_epsilon, k=k)
        x = _conv_bn(x, filters, 1, 1, f"pw{i}", epsilon=bn_epsilon, k=k)
    x = L.GlobalAveragePooling2D(name="gap")(x)
    out = L.Dense(classes, name="logits")(x)
    return k.Model(inp, out, name=name)


def mobilenet_v2_small(input_shape=(28, 28, 1), classes=10, name="mobilenet_v2_small", k=keras):
    """Stem, inverted residual blocks (expand 1x1 ReLU6, depthwise ReLU6, linear 1x1 bottleneck, residual add)."""
    L = k.layers
    inp = k.Input(input_shape, name="image")
    x = _conv_bn(inp, 16, 3, 1, "stem", k=k)
    channels = 16
    for i, (expand, filters, stride) in enumerate([(1, 16, 1), (6, 24, 2), (6, 24, 1), (6, 32, 2), (6, 32, 1)]):
        shortcut = x
        y = x if expand == 1 else _conv_bn(x, channels * expand, 1, 1, f"b{i}_expand", k=k)
        y = _conv_bn(y, None, 3, stride, f"b{i}_dw", depthwise=True, k=k)
        y = _conv_bn(y, filters, 1, 1, f"b{i}_project", activation=None, k=k)
        x = L.Add(name=f"b{i}_add")([shortcut, y]) if stride == 1 and filters == channels else y
        channels = filters
    x = _conv_bn(x, 128, 1, 1, "head", k=k)
    x = L.GlobalAveragePooling2D(name="gap")(x)
    out = L.Dense(classes, name="logits")(x)
    return k.Model(inp, out, name=name)


def resnet_small(input_shape=(28, 28, 1), classes=10, name="resnet_small", k=keras):
    """Stem, basic residual blocks (two 3x3 conv-BN, projection shortcut when the shape changes), GAP, dense."""
    L = k.layers
    inp = k.Input(input_shape, name="image")
    x = _conv_bn(inp, 16, 3, 1, "stem", activation="relu", k=k)
    channels = 16
    for i, (filters, stride) in enumerate([(16, 1), (32, 2), (64, 2)]):
        y = _conv_bn(x, filters, 3, stride, f"b{i}_conv1", activation="relu", k=k)
        y = _conv_bn(y, filters, 3, 1, f"b{i}_conv2", activation=None, k=k)
        shortcut = x if stride == 1 and filters == channels else _conv_bn(
            x, filters, 1, stride, f"b{i}_shortcut", activation=None, k=k)
        x = L.ReLU(name=f"b{i}_relu")(L.Add(name=f"b{i}_add")([shortcut, y]))
        channels = filters
    x = L.GlobalAveragePooling2D(name="gap")(x)
    out = L.Dense(classes, name="logits")(x)
    return k.Model(inp, out, name=name)


@dataclasses.dataclass(frozen=True)
class Reference:
    """A reference model: its architecture, data set and training recipe."""

    name: str
    build: Callable[..., keras.Model]
    dataset: str
    epochs: int
    batch_size: int
    learning_rate: float = 2e-3

    @property
    def path(self) -> str:
        return os.path.join(WEIGHTS_DIR, f"{self.name}.keras")


ARCHITECTURES = {"mobilenet_v1": mobilenet_v1_small, "mobilenet_v2": mobilenet_v2_small, "resnet": resnet_small}
_EPOCHS = {"fashion_mnist": 6, "digits": 40}
_BATCH = {"fashion_mnist": 128, "digits": 32}  # digits has 1,437 training images: smaller batches, more steps
_SHORT = {"fashion_mnist": "fmnist", "digits": "digits"}
REFERENCE = {f"{arch}_{_SHORT[ds]}": Reference(f"{arch}_{_SHORT[ds]}", build, ds, _EPOCHS[ds], _BATCH[ds])
             for ds in ("fashion_mnist", "digits") for arch, build in ARCHITECTURES.items()}


def mobilenet_v1_dead(input_shape=(28, 28, 1), classes=10, name="mobilenet_v1_dead", k=keras):
    """mobilenet_v1_small with PyTorch's batch-norm epsilon (1e-5); trained at Adam 2e-2 it has dead channels."""
    return mobilenet_v1_small(input_shape, classes, name=name, bn_epsilon=1e-5, k=k)


# Dead channels: a channel the ReLU6 before it never lets through has batch variance ~0, so its folded
# depthwise kernel is scaled by 1/sqrt(epsilon) (316 at 1e-5), the live channels' by ~1/sigma_B.
REFERENCE["mobilenet_v1_dead_fmnist"] = Reference("mobilenet_v1_dead_fmnist", mobilenet_v1_dead, "fashion_mnist",
                                                  _EPOCHS["fashion_mnist"], _BATCH["fashion_mnist"],
                                                  learning_rate=2e-2)


def reference(name: str) -> Reference:
    if name not in REFERENCE:
        raise ValueError(f"unknown reference model {name!r}; known: {', '.join(REFERENCE)}")
    return REFERENCE[name]


def load(name: str, keras_version: str = "2"):
    """The trained reference model `name` (see REFERENCE), from its committed weights.

    `keras_version` "3" builds the same architecture with Keras 3 (`import keras`) and the same weights.
    """
    ref = reference(name)
    if not os.path.isfile(ref.path):
        raise ReferenceUnavailable(f"{ref.path} is missing; train it with `python scripts/train_reference.py "
                                   f"--models {name}`")
    model = keras.models.load_model(ref.path, compile=False)
    if keras_version == "2":
        return model
    if keras_version != "3":
        raise ValueError(f"keras_version must be '2' or '3', got {keras_version!r}")
    import keras as keras3

    twin = ref.build(tuple(model.input_shape[1:]), model.output_shape[-1], name=model.name, k=keras3)
    twin.set_weights(model.get_weights())
    return twin


def manifest() -> dict:
    """name -> what training measured (test accuracy, epochs, seed, data set, parameters)."""
    if not os.path.isfile(MANIFEST):
        return {}
    with open(MANIFEST, encoding="utf-8") as f:
        return json.load(f)


def train(model, dataset: str, epochs: int = 3, batch_size: int = 128, seed: int = 0, verbose: int = 0,
          learning_rate: float = 2e-3):
    """Trains `model` (logits output) on a data set of `datasets`; returns test accuracy.

    Adam with a cosine-decayed learning rate; fixed seeds and deterministic ops,
    so the same call on a model built after `keras.utils.set_random_seed(seed)`
    gives the same weights on the same machine.
    """
    import tensorflow as tf

    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()
    (x_train, y_train), (x_test, y_test) = datasets.load(dataset)
    steps = epochs * -(-len(x_train) // batch_size)
    schedule = keras.optimizers.schedules.CosineDecay(learning_rate, steps, alpha=0.05)
    model.compile(keras.optimizers.Adam(schedule),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True), ["accuracy"])
    model.fit(x_train, y_train, batch_size=batch_size, epochs=epochs, verbose=verbose, shuffle=True)
    return float(model.evaluate(x_test, y_test, batch_size=512, verbose=0)[1])
