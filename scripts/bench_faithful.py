"""Does the file compute what was simulated? Simulated (Keras fake-quant) vs TFLite, per preset and execution mode.

For each trained model and preset: the calibrated fake-quant Keras model is run eagerly, as a graph
(`tf.function`) and XLA-compiled (`tf.function(jit_compile=True)`), and compared with the int8 TFLite file
(LiteRT) on held-out test images: the largest difference in the file's output steps, the share of outputs
more than one step apart, and the top-1 accuracy of each (labels) and their difference in points.

    python scripts/bench_faithful.py                                      # markdown table on stdout
    python scripts/bench_faithful.py --models resnet_digits --presets int8,w8a4 --samples 500

int16x8 has no fake-quant model (the converter calibrates it itself), so it has no simulated column.
"""

from __future__ import annotations

import argparse

import qtoolkit  # noqa: F401  (TensorFlow's log level before TensorFlow is imported)
import numpy as np
import tensorflow as tf

from qtoolkit import datasets, verify, zoo
from qtoolkit.pipeline import ptq
from qtoolkit.prepare import prepare

MODELS = ("mobilenet_v1_digits", "mobilenet_v2_digits", "resnet_digits")
PRESETS = ("int8", "int8_per_tensor", "int8_max_accuracy", "w4a8", "w8a4")
MODES = ("eager", "graph", "XLA")


def simulate(model, x, mode: str, batch: int = 100) -> np.ndarray:
    """The fake-quant model's first output on `x`, run eagerly, as a graph or XLA-compiled."""
    call = {"eager": lambda t: model(t, training=False),
            "graph": tf.function(lambda t: model(t, training=False)),
            "XLA": tf.function(lambda t: model(t, training=False), jit_compile=True)}[mode]
    outs = []
    for i in range(0, len(x), batch):
        out = call(tf.constant(x[i:i + batch]))
        outs.append((out[0] if isinstance(out, (list, tuple)) else out).numpy())
    return np.concatenate(outs)


def measure(name: str, preset: str, n_cal: int, n_ver: int) -> list[dict]:
    model = zoo.load(name)
    (x_train, _), (x_test, y_test) = datasets.load(zoo.REFERENCE[name].dataset)
    x, y = x_test[:n_ver], y_test[:n_ver]
    prepared = prepare(model, x_train[:n_cal], preset, verification_data=x, progress=False)
    result = ptq(prepared, progress=False)
    lite = verify.LiteRTModel(result.tflite)
    tfl = lite.predict(x)
    step = float(lite.output_details()[0]["quantization"][0]) or 1.0
    rows = []
    for mode in MODES if prepared.rewritten is not None else ():
        sim = simulate(prepared.rewritten.model, x, mode)
        gap = np.abs(sim - tfl) / step
        rows.append({"model": name, "preset": preset, "mode": mode, "max_steps": float(gap.max()),
                     "over_1_step": float(np.mean(gap > 1 + 1e-3)),
                     "sim_acc": 100 * float(np.mean(sim.argmax(-1) == y)),
                     "tflite_acc": 100 * float(np.mean(tfl.argmax(-1) == y))})
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--presets", default=",".join(PRESETS))
    parser.add_argument("--calibration_samples", type=int, default=500)
    parser.add_argument("--samples", type=int, default=300, help="held-out test images compared")
    args = parser.parse_args()
    print("| model | preset | execution | max gap (output steps) | outputs > 1 step apart | simulated top-1 % | "
          "TFLite top-1 % | difference (points) |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for name in args.models.split(","):
        for preset in args.presets.split(","):
            for r in measure(name, preset, args.calibration_samples, args.samples):
                print(f"| {r['model']} | {r['preset']} | {r['mode']} | {r['max_steps']:.2f} | "
                      f"{100 * r['over_1_step']:.3f}% | {r['sim_acc']:.2f} | {r['tflite_acc']:.2f} | "
                      f"{r['sim_acc'] - r['tflite_acc']:+.2f} |", flush=True)


if __name__ == "__main__":
    main()
