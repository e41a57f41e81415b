"""A trained Keras 3 MobileNet (alpha 0.25) through `python -m qtoolkit.convert`, against its tf_keras twin.

Trains `keras.applications.MobileNet(alpha=0.25)` (Keras 3) on CIFAR-10 training images, saves it as
`.keras`, converts the file with the command line (qtoolkit's own path; its verification table has the
simulation gap), then converts the same weights built with `tf_keras.applications.MobileNet` and compares:
accuracy of both int8 files on held-out images, and how far apart their outputs are (in output steps).

    python scripts/keras3_mobilenet_cli.py --cifar ../shared/data/cifar10_train_10k_jpg.tar

Images 0-7999 (fixed shuffled order) train, 500 of them calibrate, 8000-9999 evaluate.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import keras
import numpy as np
import tf_keras

import qtoolkit
from qtoolkit import verify

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from keras3_cifar_qat import load_cifar  # noqa: E402  (the same loader and split order)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cifar", required=True)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--workdir", default=os.path.join("build", "keras3_mobilenet"))
    args = parser.parse_args()
    x, y = load_cifar(args.cifar)
    x_train, y_train, x_ev, y_ev = x[:8000], y[:8000], x[8000:], y[8000:]
    os.makedirs(args.workdir, exist_ok=True)
    path = os.path.join(args.workdir, "mobilenet025.keras")
    kwargs = dict(alpha=0.25, input_shape=(32, 32, 3), weights=None, classes=10, classifier_activation=None)
    keras.utils.set_random_seed(0)
    model = keras.applications.MobileNet(**kwargs)
    steps = args.epochs * -(-len(x_train) // 64)
    model.compile(keras.optimizers.Adam(keras.optimizers.schedules.CosineDecay(2e-3, steps)),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"],
                  jit_compile=False)
    model.fit(x_train, y_train, batch_size=64, epochs=args.epochs, verbose=0, shuffle=True)
    model.save(path)
    for name, array in (("calibration", x_train[:500]), ("x_eval", x_ev), ("y_eval", y_ev)):
        np.save(os.path.join(args.workdir, f"{name}.npy"), array)
    out = os.path.join(args.workdir, "mobilenet025_int8.tflite")
    command = [sys.executable, "-m", "qtoolkit.convert", f"--model={path}", f"--output={out}",
               f"--calibration_data={args.workdir}/calibration.npy",
               f"--verification_data={args.workdir}/x_eval.npy", f"--labels={args.workdir}/y_eval.npy"]
    print("+ " + " ".join(command[1:]), flush=True)
    subprocess.run(command, check=True)

    twin = tf_keras.applications.MobileNet(**kwargs)
    twin.set_weights(model.get_weights())
    theirs = qtoolkit.ptq(twin, x_train[:500], "int8", verification_data=x_ev, labels=y_ev, progress=False)
    ours = verify.LiteRTModel(open(out, "rb").read())
    k3_out, k2_out = ours.predict(x_ev), verify.LiteRTModel(theirs.tflite).predict(x_ev)
    acc = lambda o: float(np.mean(np.asarray(o).argmax(1) == y_ev))  # noqa: E731
    print(f"\n| build | float accuracy | int8 accuracy (LiteRT) |\n|---|---|---|\n"
          f"| Keras 3 .keras through the CLI | {acc(model.predict(x_ev, verbose=0)):.4f} | {acc(k3_out):.4f} |\n"
          f"| tf_keras twin, same weights | {acc(twin.predict(x_ev, verbose=0)):.4f} | {acc(k2_out):.4f} |")
    print(f"\nmax difference between the two int8 files' outputs: "
          f"{np.max(np.abs(k3_out - k2_out)) / ours.output_step():.2f} output steps; files identical: "
          f"{open(out, 'rb').read() == theirs.tflite}")


if __name__ == "__main__":
    main()
