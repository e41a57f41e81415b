"""Builds the docs/debugging.md example: a small MobileNet-style model trained on digits, then damaged.

    python scripts/debug_demo.py OUT_DIR
    python -m qtoolkit.debug --model OUT_DIR/digits_damaged.keras --calibration_data OUT_DIR/calib.npy \\
        --num_calibration_samples 250 --num_samples 109 --output OUT_DIR/report_damaged

Writes digits.keras (trained), digits_damaged.keras (pw1 with one weight 50x the
layer's largest), calib.npy (the digits test split) and labels_ver.npy (labels
of the samples after the first 250).
"""

import os
import sys

import numpy as np

from qtoolkit import datasets, zoo


def main(out):
    os.makedirs(out, exist_ok=True)
    (x_train, _), (x_test, y_test) = datasets.load("digits")
    model = zoo.mobilenet_v1_small(x_train.shape[1:], 10, width=16)
    print("float test accuracy", zoo.train(model, "digits", epochs=20, batch_size=32))
    model.save(os.path.join(out, "digits.keras"))
    k = model.get_layer("pw1").get_weights()[0]
    k[0, 0, 3, 5] = 50.0 * np.abs(k).max()
    model.get_layer("pw1").set_weights([k])
    model.save(os.path.join(out, "digits_damaged.keras"))
    np.save(os.path.join(out, "calib.npy"), x_test.astype(np.float32))
    np.save(os.path.join(out, "labels_ver.npy"), y_test[250:].astype(np.int64))


if __name__ == "__main__":
    main(sys.argv[1])
