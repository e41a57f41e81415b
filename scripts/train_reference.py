"""Trains the reference models of qtoolkit.zoo and writes their weights and manifest.

Fixed seeds and deterministic ops: the same command on the same machine gives
the same weights. The weights are committed (qtoolkit/zoo/weights/), so the
regression job and the paper reproduction do not retrain.

    python scripts/train_reference.py                     # all of them
    python scripts/train_reference.py --models resnet_digits,mobilenet_v1_fmnist
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import qtoolkit  # noqa: F401  (TensorFlow's log level before TensorFlow is imported)
import tf_keras as keras

from qtoolkit import datasets, export, zoo


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(zoo.REFERENCE),
                        help=f"comma-separated names (default: all of {', '.join(zoo.REFERENCE)})")
    parser.add_argument("--epochs", type=int, default=None, help="override each model's epochs (for trials)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    manifest = zoo.manifest()
    for name in args.models.split(","):
        ref = zoo.reference(name)
        (x_train, _), (x_test, _) = datasets.load(ref.dataset)
        keras.utils.set_random_seed(args.seed)  # the initial weights too
        model = ref.build(x_train.shape[1:], 10, name=name)
        epochs = args.epochs or ref.epochs
        t0 = time.perf_counter()
        accuracy = zoo.train(model, ref.dataset, epochs=epochs, batch_size=ref.batch_size, seed=args.seed,
                             learning_rate=ref.learning_rate)
        seconds = time.perf_counter() - t0
        os.makedirs(zoo.WEIGHTS_DIR, exist_ok=True)
        tmp = ref.path + ".tmp.keras"
        clean = ref.build(x_train.shape[1:], 10, name=name)  # uncompiled: no optimizer state in the file
        clean.set_weights(model.get_weights())
        clean.save(tmp)
        os.replace(tmp, ref.path)
        manifest[name] = {"architecture": name.rsplit("_", 1)[0], "dataset": ref.dataset, "epochs": epochs,
                          "seed": args.seed, "batch_size": ref.batch_size,
                          "learning_rate": ref.learning_rate, "test_accuracy": round(accuracy, 4),
                          "test_samples": int(len(x_test)), "parameters": int(model.count_params()),
                          "train_seconds": round(seconds, 1)}
        print(f"{name}: test accuracy {accuracy:.4f} after {epochs} epochs ({seconds:.0f} s, "
              f"{model.count_params():,} parameters)", flush=True)
        export.write_atomic(zoo.MANIFEST, (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
