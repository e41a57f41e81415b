"""int8 vs float latency of single layers in LiteRT/XNNPACK: where int8 is slower on this CPU.

Each case is a one-layer Keras model converted twice (float, and the TFLite
converter's full-integer PTQ with int8 input/output), both measured in
alternating rounds in this one run (LiteRT, batch 1, 1 thread, median).  It
explains why narrow networks (MobileNetV3Small) are not much faster in int8
than in float on this machine whatever graph the exporter writes: the cost is
in XNNPACK's int8 kernels for narrow layers, not in partitions or extra ops.

    python scripts/bench_layers.py [--runs 200] [--no-models]

Then (unless --no-models) MobileNetV3Small at 224x224, full and minimalistic
(no hard-swish, no squeeze-excite), weights=None: float, the converter's int8
and qtoolkit's int8, measured alternately.
"""

from __future__ import annotations

import argparse

import qtoolkit  # noqa: F401  (TensorFlow's log level before TensorFlow is imported)
import numpy as np
import tf_keras as keras

from qtoolkit import export, runtime
from qtoolkit.pipeline import ptq

L = keras.layers

# name -> (input size, input channels, layer factory)
CASES = {
    "stem conv 3x3/2, 3 -> 16, 224x224 (MobileNetV3 stem)": (224, 3, lambda: L.Conv2D(16, 3, 2, padding="same")),
    "stem conv 3x3/2, 3 -> 32, 224x224 (MobileNet stem)": (224, 3, lambda: L.Conv2D(32, 3, 2, padding="same")),
    "1x1 depthwise, 3 channels, 224x224 (input affine as a conv)": (224, 3, lambda: L.DepthwiseConv2D(1)),
    "Rescaling x/127.5 - 1, 224x224x3 (MUL + ADD)": (224, 3, lambda: L.Rescaling(1 / 127.5, -1.0)),
    "conv 1x1, 16 -> 16, 112x112": (112, 16, lambda: L.Conv2D(16, 1)),
    "conv 1x1, 64 -> 64, 56x56": (56, 64, lambda: L.Conv2D(64, 1)),
    "conv 1x1, 256 -> 256, 14x14": (14, 256, lambda: L.Conv2D(256, 1)),
    "depthwise 3x3, 16 channels, 112x112": (112, 16, lambda: L.DepthwiseConv2D(3, padding="same")),
    "depthwise 3x3, 96 channels, 28x28": (28, 96, lambda: L.DepthwiseConv2D(3, padding="same")),
    "depthwise 3x3, 512 channels, 14x14": (14, 512, lambda: L.DepthwiseConv2D(3, padding="same")),
}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--no-models", dest="models", action="store_false",
                        help="only the one-layer table, not MobileNetV3Small")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    print("| layer | float ms | int8 ms | int8 speed-up (float / int8) |\n|---|---|---|---|")
    for name, (size, channels, make) in CASES.items():
        inputs = keras.Input((size, size, channels))
        model = keras.Model(inputs, make()(inputs))
        x = rng.uniform(0, 1, (8, size, size, channels)).astype(np.float32)
        pair = {"float": export.float_tflite(model),
                "int8": export.converter_ptq_tflite(model, lambda: ([x[i:i + 1]] for i in range(len(x))))}
        ms = runtime.alternate_median_ms(pair, threads=1, runs=args.runs)
        print(f"| {name} | {ms['float']:.3f} | {ms['int8']:.3f} | {ms['float'] / ms['int8']:.2f}x |", flush=True)
    if args.models:
        models(args.runs)


def models(runs):
    print("\n| MobileNetV3Small 224x224 | float ms | converter int8 ms | qtoolkit int8 ms | float / converter | "
          "float / qtoolkit | partitions (converter, qtoolkit) |\n|---|---|---|---|---|---|---|")
    for label, minimalistic in (("minimalistic", True), ("full", False)):
        model = keras.applications.MobileNetV3Small(weights=None, input_shape=(224, 224, 3),
                                                    classifier_activation=None, minimalistic=minimalistic)
        x = np.random.default_rng(0).uniform(0, 255, (64, 224, 224, 3)).astype(np.float32)
        flt = export.float_tflite(model)
        conv = export.converter_ptq_tflite(model, lambda: ([x[i:i + 1]] for i in range(len(x))))
        ours = ptq(model, x, "int8", num_verification_samples=1, progress=False).tflite
        ms = runtime.alternate_median_ms({"float": flt, "converter": conv, "qtoolkit": ours}, threads=1, runs=runs)
        print(f"| {label} | {ms['float']:.3f} | {ms['converter']:.3f} | {ms['qtoolkit']:.3f} | "
              f"{ms['float'] / ms['converter']:.2f}x | {ms['float'] / ms['qtoolkit']:.2f}x | "
              f"{runtime.delegation(conv).partitions}, {runtime.delegation(ours).partitions} |", flush=True)


if __name__ == "__main__":
    main()
