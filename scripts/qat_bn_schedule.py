"""Which batch-norm schedule for int8 QAT? Chosen on one half of the test set, confirmed on the other.

For each seed: TFMOT's quantize_model and qtoolkit's quantize_model with batch
norm frozen half-way, never frozen, or frozen from the first step; one epoch of
the fine-tuning of scripts/bench_qat.py on the committed reference model, int8
TFLite accuracy (LiteRT) on test images 0-4999 (A, where the schedule is
chosen) and 5000-9999 (B, where the choice is checked). Use seeds that
bench_qat.py's reported run does not use.

    python scripts/qat_bn_schedule.py --seeds 8,9,10,11,12,13     # ~9 minutes per seed here
"""

from __future__ import annotations

import argparse

import qtoolkit  # noqa: F401  (TensorFlow's log level before TensorFlow is imported)
import numpy as np
import tensorflow as tf

from bench_qat import _copy, fine_tune
from qtoolkit import datasets, verify, zoo
from qtoolkit.callbacks import QuantizationCallback


def halves(outputs, y):
    """Accuracy in % on the first and the second half of the test set."""
    correct = np.asarray(outputs).argmax(1) == y
    half = len(y) // 2
    return 100 * correct[:half].mean(), 100 * correct[half:].mean()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="8,9,10,11,12,13")
    parser.add_argument("--model", default="mobilenet_v1_fmnist")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    (x, y), (x_test, y_test) = datasets.load("fashion_mnist")
    model = zoo.load(args.model)
    steps = -(-len(x) // 128)
    import tensorflow_model_optimization as tfmot

    results = {}  # schedule -> list of (A, B)
    for seed in seeds:
        tm = tfmot.quantization.keras.quantize_model(_copy(model))
        fine_tune(tm, x, y, 1, seed)
        conv = tf.lite.TFLiteConverter.from_keras_model(tm)
        conv.optimizations = [tf.lite.Optimize.DEFAULT]
        conv.inference_input_type = conv.inference_output_type = tf.int8
        results.setdefault("TFMOT", []).append(halves(verify.LiteRTModel(conv.convert()).predict(x_test), y_test))
        print(f"seed {seed} TFMOT A/B {results['TFMOT'][-1]}", flush=True)
        for label, freeze in (("qtoolkit, frozen half-way", steps // 2), ("qtoolkit, never frozen", None),
                              ("qtoolkit, frozen from step 0", 0)):
            qm = qtoolkit.quantize_model(_copy(model), "int8", calibration_data=x[:512])
            fine_tune(qm, x, y, 1, seed, [QuantizationCallback(bn_freeze_step=freeze)])
            data, _ = qtoolkit.export_tflite(qm)
            results.setdefault(label, []).append(halves(verify.LiteRTModel(data).predict(x_test), y_test))
            print(f"seed {seed} {label} A/B {results[label][-1]}", flush=True)

    print(f"\nint8 TFLite accuracy (%), seeds {args.seeds}: mean over seeds of half A (choose), half B (check)\n")
    print("| schedule | A: test 0-4999 | B: test 5000-9999 | all | per seed (all) |\n|---|---|---|---|---|")
    for label, runs in results.items():
        a, b = np.mean(runs, axis=0)
        per_seed = " ".join(f"{(ra + rb) / 2:.2f}" for ra, rb in runs)
        print(f"| {label} | {a:.2f} | {b:.2f} | {(a + b) / 2:.2f} | {per_seed} |")


if __name__ == "__main__":
    main()
