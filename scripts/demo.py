"""The demo behind scripts/demo.sh: train a small CNN on real data, quantize, verify.

Trains a small depthwise-separable CNN with batch norm on scikit-learn's
digits (fixed seeds, ~20 s on 2 cores), then converts it to a fully-int8
TFLite model and prints how far the int8 model is from the float one,
measured with the LiteRT interpreter on held-out digits.

    python scripts/demo.py [--workdir build/demo]
"""

import argparse
import os
import sys
import time

import qtoolkit  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow)
import numpy as np
import tensorflow as tf
import tf_keras as keras

from qtoolkit import datasets


def build_model(input_shape, classes):
    """Conv-BN-ReLU6, a depthwise-separable block and a classifier."""
    inputs = keras.Input(input_shape, name="image")
    x = keras.layers.Conv2D(16, 3, padding="same", use_bias=False)(inputs)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.ReLU(6.0)(x)
    x = keras.layers.DepthwiseConv2D(3, padding="same", use_bias=False)(x)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.ReLU(6.0)(x)
    x = keras.layers.Conv2D(32, 1, use_bias=False)(x)
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
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True), ["accuracy"])
    start = time.time()
    model.fit(x_train, y_train, batch_size=32, epochs=15, verbose=0)
    print(f"trained {model.name} on digits in {time.time() - start:.1f} s "
          f"({model.count_params()} parameters)")
    os.makedirs(workdir, exist_ok=True)
    model_path = os.path.join(workdir, "model.keras")
    model.save(model_path)
    np.save(os.path.join(workdir, "calibration.npy"), x_train[:500])
    np.savez(os.path.join(workdir, "test.npz"), x=x_test, y=y_test)
    return model, x_train[:500], x_test, y_test


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="build/demo", help="where the model and data are written")
    args = parser.parse_args(argv)
    model, calib, x_test, y_test = train(args.workdir)
    return convert_and_compare(model, calib, x_test, y_test, args.workdir)


def convert_and_compare(model, calib, x_test, y_test, workdir):
    """Full-int8 conversion with the TFLite converter, then a LiteRT comparison."""
    from qtoolkit import verify

    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = lambda: ([calib[i:i + 1]] for i in range(len(calib)))
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = converter.inference_output_type = tf.int8
    path = os.path.join(workdir, "model_int8.tflite")
    with open(path, "wb") as f:
        f.write(converter.convert())
    tfl = verify.LiteRTModel(path)
    report = {"float vs int8": verify.compare(verify.predict_keras(model, x_test), tfl.predict(x_test), y_test,
                                              output_step=tfl.output_step())}
    print(f"\nint8 TFLite model: {path} ({os.path.getsize(path) / 1024:.1f} KiB)")
    print(f"verification on {len(x_test)} held-out digits (LiteRT interpreter):\n")
    print(verify.format_table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
