"""qtoolkit QAT vs TFMOT QAT on the same model, data, epochs and seed; and the paper's table 5.

Starts from a Fashion-MNIST reference model of qtoolkit.zoo (default the MobileNet-v1-style one,
committed weights), fine-tunes it with each tool, exports
int8 TFLite and evaluates everything on the 10,000 test images with the LiteRT
interpreter. Reports: Keras QAT accuracy, exported int8 accuracy, their gap,
and the training step time. Then w4a8 (4-bit weights): float, PTQ and QAT.

    python scripts/bench_qat.py [--epochs 1] [--train_samples 60000] [--seeds 0,1,2] [--model mobilenet_v1_fmnist]
                                [--bn_freeze never|half|start] [--keras 2|3]

With --cifar PATH (the tar of CIFAR-10 JPEGs in ../shared/data/) it runs scripts/bench_qat_cifar.py instead:
pretrained CIFAR-10 ResNet-8 and MobileNet-style networks, int8 and w4a8, qtoolkit vs TFMOT, mean ± standard
error over --seeds (every other flag goes to that script):

    python scripts/bench_qat.py --cifar ../shared/data/cifar10_train_10k_jpg.tar --seeds 0,1,2

With --keras 3 the float fine-tune and qtoolkit's QAT run on the reference model built with Keras 3 (the same
weights; Keras 3's compile/fit); TFMOT, which accepts only Keras 2, runs on the tf_keras build.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import keras as keras3  # Keras 3, for --keras 3
import numpy as np
import tensorflow as tf
import tf_keras as keras

import qtoolkit
from qtoolkit import datasets, export, verify
from qtoolkit.callbacks import QuantizationCallback
from qtoolkit.pipeline import ptq


class StepTimer(keras.callbacks.Callback):
    def on_train_begin(self, logs=None):
        self.times = []

    def on_train_batch_begin(self, batch, logs=None):
        self.start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        self.times.append(time.perf_counter() - self.start)

    @property
    def median_ms(self):
        return 1000 * float(np.median(self.times[5:] or self.times))


def accuracy(outputs, y):
    return float(np.mean(np.asarray(outputs).argmax(1) == y))


def fine_tune(qm, x, y, epochs, seed, callbacks=()):
    k = keras3 if isinstance(qm, keras3.Model) else keras
    k.utils.set_random_seed(seed)
    qm.compile(k.optimizers.Adam(1e-4), k.losses.SparseCategoricalCrossentropy(from_logits=True),
               metrics=["accuracy"])
    timer = StepTimer()
    qm.fit(x, y, batch_size=128, epochs=epochs, verbose=0, callbacks=[timer, *callbacks], shuffle=True)
    return timer.median_ms


def main():
    if any(a == "--cifar" or a.startswith("--cifar=") for a in sys.argv[1:]):
        from bench_qat_cifar import main as cifar  # scripts/ is on sys.path: this script's folder

        return cifar(sys.argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cifar", help="run scripts/bench_qat_cifar.py on this CIFAR-10 tar instead (its flags)")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--train_samples", type=int, default=60000)
    parser.add_argument("--seeds", default="0", help="comma-separated seeds; each tool is run once per seed, "
                                                      "rows are per seed plus the mean")
    parser.add_argument("--bn_freeze", choices=("never", "half", "start"), default="never",
                        help="int8 QAT batch-norm schedule: never frozen (default, chosen on held-out data by "
                             "scripts/qat_bn_schedule.py), frozen half-way, or from the first step")
    parser.add_argument("--model", default="mobilenet_v1_fmnist",
                        help="a Fashion-MNIST reference model name (qtoolkit.zoo) or a .keras path")
    parser.add_argument("--keras", choices=("2", "3"), default="2",
                        help="build the model qtoolkit fine-tunes with tf_keras (2) or Keras 3 (3)")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    (x_train, y_train), (x_test, y_test) = datasets.load("fashion_mnist")
    x, y = x_train[:args.train_samples], y_train[:args.train_samples]
    if os.path.exists(args.model):
        model = keras.models.load_model(args.model)
    else:
        from qtoolkit import zoo

        model = zoo.load(args.model)
    ours = model  # what the float fine-tune and qtoolkit's QAT start from
    if args.keras == "3":
        from qtoolkit import zoo

        ours = zoo.load(args.model, "3")
    float_acc = accuracy(model.predict(x_test, batch_size=512, verbose=0), y_test)
    steps = args.epochs * -(-len(x) // 128)
    rows = {}  # tool -> list of (keras_acc, int8_acc, step_ms, inspection) over seeds
    import tensorflow_model_optimization as tfmot

    for seed in seeds:
        # The float model fine-tuned the same way: QAT also trains, so compare with this too.
        ft = _copy(ours)
        ms = fine_tune(ft, x, y, args.epochs, seed)
        rows.setdefault("float, fine-tuned likewise (reference)", []).append(
            (accuracy(ft.predict(x_test, batch_size=512, verbose=0), y_test), float("nan"), ms, None))

        tm = tfmot.quantization.keras.quantize_model(_copy(model))
        ms = fine_tune(tm, x, y, args.epochs, seed)
        keras_acc = accuracy(tm.predict(x_test, batch_size=512, verbose=0), y_test)
        conv = tf.lite.TFLiteConverter.from_keras_model(tm)
        conv.optimizations = [tf.lite.Optimize.DEFAULT]
        conv.inference_input_type = conv.inference_output_type = tf.int8
        data = conv.convert()
        rows.setdefault("TFMOT quantize_model", []).append(
            (keras_acc, accuracy(verify.LiteRTModel(data).predict(x_test), y_test), ms, export.inspect(data)))

        # qtoolkit's recipe: calibrated starting ranges, batch norm folded with the paper's correction;
        # for 8 bits on a converged model never frozen (docs/qat.md, "Choosing bn_freeze_step").
        qm = qtoolkit.quantize_model(_copy(ours), "int8", calibration_data=x_train[:512])
        freeze = {"never": None, "half": steps // 2, "start": 0}[args.bn_freeze]
        ms = fine_tune(qm, x, y, args.epochs, seed, [QuantizationCallback(bn_freeze_step=freeze)])
        keras_acc = accuracy(qm.predict(x_test, batch_size=512, verbose=0), y_test)
        data, insp = qtoolkit.export_tflite(qm)
        rows.setdefault("qtoolkit quantize_model", []).append(
            (keras_acc, accuracy(verify.LiteRTModel(data).predict(x_test), y_test), ms, insp))

    print(f"model {args.model}: float accuracy {float_acc:.4f}; {args.epochs} epoch(s) of QAT on {len(x)} images, "
          f"seeds {args.seeds}; qtoolkit int8 batch norm frozen: {args.bn_freeze}; qtoolkit and the float "
          f"fine-tune on Keras {args.keras}, TFMOT on tf_keras\n")
    print("| tool | seed | Keras QAT accuracy | int8 TFLite accuracy | gap (points) | per-channel weights | "
          "train step ms (batch 128) |\n|---|---|---|---|---|---|---|")
    for name, runs in rows.items():
        labelled = [(str(s), r) for s, r in zip(seeds, runs)]
        if len(runs) > 1:
            labelled.append(("mean", tuple(float(np.mean([r[i] for r in runs])) for i in range(3)) + (runs[0][3],)))
        for seed, (k, i, ms, insp) in labelled:
            if insp is None:
                print(f"| {name} | {seed} | {k:.4f} (float) | - | - | - | {ms:.1f} |")
                continue
            print(f"| {name} | {seed} | {k:.4f} | {i:.4f} | {100 * (k - i):+.2f} | "
                  f"{sum(w.per_channel for w in insp.weights)}/{len(insp.weights)} | {ms:.1f} |")
    ft_acc = float(np.mean([r[0] for r in rows["float, fine-tuned likewise (reference)"]]))
    seed = seeds[0]

    # Paper table 5: 4-bit weights, 8-bit activations; batch norm frozen half-way, which the 4-bit
    # folding ablation of docs/paper_results.md favours.
    ptq4 = ptq(ours, x_train[:1000], "w4a8", verification_data=x_test, labels=y_test, progress=False)
    qm4 = qtoolkit.quantize_model(_copy(ours), "w4a8", calibration_data=x_train[:512])
    fine_tune(qm4, x, y, args.epochs, seed, [QuantizationCallback(bn_freeze_step=steps // 2)])
    data4, insp4 = qtoolkit.export_tflite(qm4)
    qat4 = accuracy(verify.LiteRTModel(data4).predict(x_test), y_test)
    levels = max_levels_per_channel(data4)
    print("\n| w4a8 (int8 TFLite) | float | float fine-tuned | PTQ | QAT |\n|---|---|---|---|---|")
    print(f"| accuracy | {float_acc:.4f} | {ft_acc:.4f} | "
          f"{ptq4.comparisons['float vs TFLite'].candidate_accuracy:.4f} | {qat4:.4f} |")
    print(f"\nmost distinct values in one weight channel of the QAT w4a8 file: {levels} (conv/depthwise)")


def _copy(model):
    clone = (keras3 if isinstance(model, keras3.Model) else keras).models.clone_model(model)
    clone.set_weights(model.get_weights())
    return clone


def max_levels_per_channel(data):
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    it = Interpreter(model_content=data,
                     experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    tensors = {t["index"]: t for t in it.get_tensor_details()}
    most = 0
    for op in it._get_ops_details():
        if op["op_name"] in ("CONV_2D", "DEPTHWISE_CONV_2D"):
            t = tensors[op["inputs"][1]]
            w = it.get_tensor(t["index"])
            axis = t["quantization_parameters"]["quantized_dimension"]
            most = max(most, max(len(np.unique(np.take(w, c, axis=axis))) for c in range(w.shape[axis])))
    return most


if __name__ == "__main__":
    main()
