"""Keras 3 QAT on a pretrained CIFAR-10 ResNet: the exported int8 file against the same fine-tune in float.

Pretrains a ResNet-8-style network (`qtoolkit.zoo.resnet_small`, built with Keras 3) on CIFAR-10 training
images, then, per seed, fine-tunes it twice the same way (Adam 1e-4, batch 64) on other images: in float, and
with `qtoolkit.quantize_model` (a Keras 3 QAT model) + Keras 3 `fit` + `QuantizationCallback`. Both are
evaluated on held-out images that neither saw: the float model with Keras, the QAT model's exported int8
file with the LiteRT interpreter.

    python scripts/keras3_cifar_qat.py --cifar ../shared/data/cifar10_train_10k_jpg.tar --seeds 0,1,2

The 10,000 images are split in a fixed order: 0-4999 pretraining, 5000-7999 fine-tuning, 8000-9999
evaluation. The pretrained weights are cached in --cache (delete it to pretrain again).
"""

from __future__ import annotations

import argparse
import os
import tarfile
import time

import keras
import numpy as np
import tensorflow as tf

import qtoolkit
from qtoolkit import verify, zoo
from qtoolkit.callbacks import QuantizationCallback

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def load_cifar(path: str):
    """(images float32 in [0, 1], labels) from the tar of JPEGs under train/<class>/, in a fixed shuffled order."""
    images, labels = [], []
    with tarfile.open(path) as tar:
        for member in sorted(tar.getmembers(), key=lambda m: m.name):
            parts = member.name.split("/")
            if not member.isfile() or len(parts) != 3 or parts[1] not in CLASSES:
                continue
            data = tar.extractfile(member).read()
            images.append(tf.io.decode_jpeg(data, channels=3).numpy())
            labels.append(CLASSES.index(parts[1]))
    x = np.stack(images).astype(np.float32) / 255.0
    y = np.array(labels, np.int64)
    order = np.random.default_rng(0).permutation(len(x))
    return x[order], y[order]


def compile_model(model, learning_rate):  # a float or a schedule
    model.compile(keras.optimizers.Adam(learning_rate), keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"], jit_compile=False)


def pretrained(x, y, epochs, cache):
    path = os.path.join(cache, f"resnet8_keras3_{epochs}ep_cosine.weights.h5")
    keras.utils.set_random_seed(0)
    model = zoo.resnet_small((32, 32, 3), 10, name="resnet8_cifar", k=keras)
    if os.path.exists(path):
        model.load_weights(path)
        return model
    steps = epochs * -(-len(x) // 64)
    compile_model(model, keras.optimizers.schedules.CosineDecay(2e-3, steps))  # converged, not mid-step
    start = time.time()
    model.fit(x, y, batch_size=64, epochs=epochs, verbose=0, shuffle=True)
    print(f"pretrained on {len(x)} images, {epochs} epochs, in {time.time() - start:.0f} s")
    os.makedirs(cache, exist_ok=True)
    model.save_weights(path)
    return model


def copy_of(model):
    clone = keras.models.clone_model(model)
    clone.set_weights(model.get_weights())
    return clone


def accuracy(outputs, y):
    return float(np.mean(np.asarray(outputs).argmax(1) == y))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cifar", required=True, help="the tar of CIFAR-10 JPEGs (../shared/data/...)")
    parser.add_argument("--pretrain_epochs", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=2, help="fine-tuning epochs (float and QAT alike)")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--cache", default=os.path.join("build", "cifar"))
    args = parser.parse_args()
    x, y = load_cifar(args.cifar)
    x_pre, y_pre, x_ft, y_ft, x_ev, y_ev = x[:5000], y[:5000], x[5000:8000], y[5000:8000], x[8000:], y[8000:]
    model = pretrained(x_pre, y_pre, args.pretrain_epochs, args.cache)
    base = accuracy(model.predict(x_ev, verbose=0), y_ev)
    print(f"Keras {keras.__version__}; pretrained float accuracy on the {len(x_ev)} evaluation images: {base:.4f}\n")
    print("| seed | float fine-tuned (Keras) | QAT int8 file (LiteRT) | QAT - float (points) | Keras QAT | "
          "val_int8_accuracy logged per epoch |\n|---|---|---|---|---|---|")
    diffs = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        keras.utils.set_random_seed(seed)
        ft = copy_of(model)
        compile_model(ft, 1e-4)
        ft.fit(x_ft, y_ft, batch_size=64, epochs=args.epochs, verbose=0, shuffle=True)
        float_acc = accuracy(ft.predict(x_ev, verbose=0), y_ev)

        keras.utils.set_random_seed(seed)
        qm = qtoolkit.quantize_model(model, "int8", calibration_data=x_pre[:512])
        qm.compile(keras.optimizers.Adam(1e-4), keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                   metrics=["accuracy"])
        callback = QuantizationCallback(validation_data=(x_ev, y_ev))
        history = qm.fit(x_ft, y_ft, batch_size=64, epochs=args.epochs, verbose=0, shuffle=True,
                         callbacks=[callback])
        data, inspection = qtoolkit.export_tflite(qm)
        assert inspection.fully_quantized and inspection.all_weights_per_channel
        int8_acc = accuracy(verify.LiteRTModel(data).predict(x_ev), y_ev)
        keras_acc = accuracy(qm.predict(x_ev, verbose=0), y_ev)
        logged = ", ".join(f"{v:.4f}" for v in history.history["val_int8_accuracy"])
        diffs.append(100 * (int8_acc - float_acc))
        print(f"| {seed} | {float_acc:.4f} | {int8_acc:.4f} | {diffs[-1]:+.2f} | {keras_acc:.4f} | {logged} |",
              flush=True)
    d = np.array(diffs)
    se = d.std(ddof=1) / np.sqrt(len(d)) if len(d) > 1 else float("nan")
    print(f"\nQAT int8 file minus float fine-tune over {len(d)} seeds: {d.mean():+.2f} points "
          f"(standard error {se:.2f}, range {d.min():+.2f} to {d.max():+.2f})")


if __name__ == "__main__":
    main()
