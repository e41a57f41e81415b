"""Trains the demo model of scripts/demo.sh: a small Keras 3 CNN on real data.

Trains a small depthwise-separable CNN with batch norm on scikit-learn's
digits with Keras 3 (`import keras`, what `tf.keras` is since TensorFlow
2.16; fixed seeds, ~10 s on 2 cores) and saves it with 500 training images
for calibration and the held-out test images; scripts/demo.sh then runs
`python -m qtoolkit.convert` on them.

    python scripts/demo.py [--workdir build/demo]
"""

import argparse
import os
import sys
import time

import keras
import numpy as np
import tensorflow as tf

from qtoolkit import datasets


def build_model(input_shape, classes):
    """Conv-BN-ReLU6, a depthwise-separable block and a classifier."""
    inputs = keras.Input(input_shape, name="image")
    x = keras.layers.Conv2D(24, 3, padding="same", use_bias=False)(inputs)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.ReLU(6.0)(x)
    x = keras.layers.DepthwiseConv2D(3, padding="same", use_bias=False)(x)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.ReLU(6.0)(x)
    x = keras.layers.Conv2D(48, 1, use_bias=False)(x)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.ReLU(6.0)(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(classes, name="logits")(x)
    return keras.Model(inputs, outputs, name="digits_cnn")


def train(workdir):
    """Trains the demo model and saves it with calibration and test data."""
    keras.utils.set_random_seed(0)
    tf.config.experimental.enable_op_determinism()
    (x_train, y_train), (x_test, y_test) = datasets.load("digits")
    model = build_model(x_train.shape[1:], 10)
    model.compile(keras.optimizers.Adam(3e-3),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"],
                  jit_compile=False)  # XLA's kernels are not deterministic run to run; these are
    start = time.time()
    model.fit(x_train, y_train, batch_size=32, epochs=30, verbose=0)
    print(f"trained {model.name} (Keras {keras.__version__}) on digits in {time.time() - start:.1f} s "
          f"({model.count_params()} parameters)")
    os.makedirs(workdir, exist_ok=True)
    model_path = os.path.join(workdir, "model.keras")
    model.save(model_path)
    np.save(os.path.join(workdir, "calibration.npy"), x_train[:500])
    np.save(os.path.join(workdir, "test_x.npy"), x_test)
    np.save(os.path.join(workdir, "test_y.npy"), y_test)
    print(f"wrote {model_path}, calibration.npy (500 training images), test_x.npy/test_y.npy "
          f"({len(x_test)} held-out images) in {workdir}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="build/demo", help="where the model and data are written")
    args = parser.parse_args(argv)
    train(args.workdir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
