"""Small golden models the tests build: one per layer pattern, plus a trained one."""

import numpy as np
import tf_keras as keras

L = keras.layers


def _randomize_bn(model, seed=0):
    """Gives batch norms non-trivial statistics so that folding is really tested."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, L.BatchNormalization):
            gamma, beta, mean, var = layer.get_weights()
            layer.set_weights([rng.uniform(0.5, 1.5, gamma.shape).astype(np.float32),
                               rng.normal(0, 0.2, beta.shape).astype(np.float32),
                               rng.normal(0, 0.2, mean.shape).astype(np.float32),
                               rng.uniform(0.5, 2.0, var.shape).astype(np.float32)])
        elif isinstance(layer, keras.Model):
            _randomize_bn(layer, seed + 1)
    return model


def conv_bn_relu(input_shape=(16, 16, 3)):
    inp = keras.Input(input_shape)
    x = L.Conv2D(8, 3, padding="same", use_bias=False, name="conv")(inp)
    x = L.BatchNormalization(name="bn")(x)
    x = L.ReLU(name="relu")(x)
    x = L.DepthwiseConv2D(3, depth_multiplier=2, padding="same", name="dw")(x)
    x = L.BatchNormalization(name="dw_bn")(x)
    x = L.ReLU(6.0, name="dw_relu6")(x)
    x = L.Conv2D(8, 1, activation="relu", name="pw")(x)
    x = L.GlobalAveragePooling2D(name="gap")(x)
    out = L.Dense(5, name="logits")(x)
    return _randomize_bn(keras.Model(inp, out, name="conv_bn_relu"))


def coverage(input_shape=(16, 16, 3)):
    """Residual add + ReLU, concat, max/avg pooling, padding, upsampling, reshape,
    a standalone batch norm, a nested model, swish, dropout and softmax."""
    inner_in = keras.Input((8, 8, 8))
    y = L.Conv2D(8, 3, padding="same", name="conv")(inner_in)
    y = L.BatchNormalization(name="bn")(y)
    y = L.Activation("relu", name="relu")(y)
    inner = _randomize_bn(keras.Model(inner_in, y, name="inner_block"), 3)

    inp = keras.Input(input_shape)
    x = L.ZeroPadding2D(1, name="pad")(inp)
    x = L.Conv2D(8, 3, strides=2, use_bias=False, name="stem")(x)   # 8x8
    x = L.BatchNormalization(name="stem_bn")(x)
    x = L.ReLU(6.0, name="stem_relu6")(x)
    r = inner(x)
    x = L.Add(name="add")([x, r])
    x = L.ReLU(name="add_relu")(x)
    a = L.MaxPooling2D(2, name="maxpool")(x)                         # 4x4
    b = L.AveragePooling2D(2, name="avgpool")(x)
    x = L.Concatenate(name="concat")([a, b])                         # 16 channels
    x = L.BatchNormalization(name="lonely_bn")(x)                    # follows no conv
    x = L.Conv2D(16, 1, activation="swish", name="swish_conv")(x)
    x = L.UpSampling2D(2, name="upsample")(x)                        # 8x8
    x = L.DepthwiseConv2D(3, padding="same", use_bias=False, name="dw")(x)
    x = L.BatchNormalization(name="dw_bn")(x)
    x = L.ReLU(name="dw_relu")(x)
    x = L.Dropout(0.2, name="dropout")(x)
    x = L.Reshape((8 * 8 * 16,), name="reshape")(x)
    x = L.Dense(16, name="fc")(x)
    x = L.BatchNormalization(name="fc_bn")(x)
    x = L.ReLU(name="fc_relu")(x)
    out = L.Dense(4, activation="softmax", name="classifier")(x)
    return _randomize_bn(keras.Model(inp, out, name="coverage"))


def sequential(input_shape=(12, 12, 1)):
    return keras.Sequential([
        keras.Input(input_shape),
        L.Conv2D(4, 3, activation="relu"),
        L.MaxPooling2D(),
        L.Flatten(),
        L.Dense(3),
    ], name="sequential")


class Scale2(L.Layer):
    """A custom layer qtoolkit does not know: stays float."""

    def call(self, x):
        return x * 2.0


def with_custom_layer(input_shape=(8, 8, 3)):
    inp = keras.Input(input_shape)
    x = L.Conv2D(4, 3, activation="relu")(inp)
    x = Scale2(name="scale2")(x)
    x = L.Conv2D(4, 3)(x)
    out = L.Flatten()(x)
    return keras.Model(inp, out, name="custom")


_TRAINED_DIGITS = {}  # (epochs, seed) -> trained weights: trained once per test session


def train_digits(epochs=20, seed=0):
    """A small depthwise-separable CNN with batch norm, trained on sklearn digits.

    Trained once per (epochs, seed) in a session; each call returns a new model with those weights, so a
    test that changes its model does not change another test's.
    """
    from qtoolkit import datasets

    keras.utils.set_random_seed(seed)
    (x_train, y_train), (x_test, y_test) = datasets.load("digits")
    inp = keras.Input(x_train.shape[1:])
    x = L.Conv2D(24, 3, padding="same", use_bias=False)(inp)
    x = L.BatchNormalization()(x)
    x = L.ReLU(6.0)(x)
    x = L.DepthwiseConv2D(3, padding="same", use_bias=False)(x)
    x = L.BatchNormalization()(x)
    x = L.ReLU(6.0)(x)
    x = L.Conv2D(48, 1, use_bias=False)(x)
    x = L.BatchNormalization()(x)
    x = L.ReLU(6.0)(x)
    x = L.GlobalAveragePooling2D()(x)
    out = L.Dense(10)(x)
    model = keras.Model(inp, out, name="digits_cnn")
    model.compile(keras.optimizers.Adam(3e-3),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True), ["accuracy"])
    if (epochs, seed) in _TRAINED_DIGITS:
        model.set_weights(_TRAINED_DIGITS[(epochs, seed)])
    else:
        model.fit(x_train, y_train, batch_size=32, epochs=epochs, verbose=0)
        _TRAINED_DIGITS[(epochs, seed)] = model.get_weights()
    return model, (x_train, y_train), (x_test, y_test)
