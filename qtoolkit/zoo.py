"""Reference models of the kinds the paper studies, small enough to train here.

    model = zoo.mobilenet_v1_small((28, 28, 1), 10)
    zoo.train(model, "fashion_mnist", epochs=3)

Training uses fixed seeds and deterministic ops, so the same call gives the
same weights on the same machine.
"""

from __future__ import annotations

import tf_keras as keras

from qtoolkit import datasets

L = keras.layers


def mobilenet_v1_small(input_shape=(28, 28, 1), classes=10, width=32, name="mobilenet_v1_small"):
    """Conv-BN-ReLU6 stem, four depthwise-separable blocks (BN, ReLU6), GAP, dense."""
    inp = keras.Input(input_shape, name="image")
    x = L.Conv2D(width, 3, strides=1, padding="same", use_bias=False, name="stem")(inp)
    x = L.BatchNormalization(name="stem_bn")(x)
    x = L.ReLU(6.0, name="stem_relu6")(x)
    for i, (filters, stride) in enumerate([(width * 2, 2), (width * 2, 1), (width * 4, 2), (width * 4, 1)]):
        x = L.DepthwiseConv2D(3, strides=stride, padding="same", use_bias=False, name=f"dw{i}")(x)
        x = L.BatchNormalization(name=f"dw{i}_bn")(x)
        x = L.ReLU(6.0, name=f"dw{i}_relu6")(x)
        x = L.Conv2D(filters, 1, use_bias=False, name=f"pw{i}")(x)
        x = L.BatchNormalization(name=f"pw{i}_bn")(x)
        x = L.ReLU(6.0, name=f"pw{i}_relu6")(x)
    x = L.GlobalAveragePooling2D(name="gap")(x)
    out = L.Dense(classes, name="logits")(x)
    return keras.Model(inp, out, name=name)


def train(model, dataset: str, epochs: int = 3, batch_size: int = 128, seed: int = 0, verbose: int = 0):
    """Trains `model` (logits output) on a data set of `datasets`; returns test accuracy."""
    import tensorflow as tf

    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()
    (x_train, y_train), (x_test, y_test) = datasets.load(dataset)
    model.compile(keras.optimizers.Adam(2e-3),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True), ["accuracy"])
    model.fit(x_train, y_train, batch_size=batch_size, epochs=epochs, verbose=verbose, shuffle=True)
    return float(model.evaluate(x_test, y_test, batch_size=512, verbose=0)[1])
