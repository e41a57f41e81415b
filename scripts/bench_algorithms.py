"""Cross-layer equalization, bias correction and AdaRound on a MobileNet-style model (issue 7).

Every row is a PTQ run through `qtoolkit.ptq` (LiteRT accuracy on held-out test
images, same calibration samples), all measured in this one run:

    python scripts/bench_algorithms.py                        # trains/caches build/algorithms/mobilenet_v1_small_fmnist.keras
    python scripts/bench_algorithms.py --model ref.keras --dataset fashion_mnist --qat_epochs 0
    python scripts/bench_algorithms.py --model zoo:mobilenet_v1_fmnist,zoo:mobilenet_v1_dead_fmnist --write docs/paper_results.md

--model takes comma-separated .keras paths or zoo:NAME reference models (one
table each). The tables go to stdout and, with --write, replace the section
"## Beyond the paper: CLE, bias correction and AdaRound" of that file
(created if missing), written atomically.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import qtoolkit  # noqa: F401  (TensorFlow's log level before TensorFlow is imported)
import numpy as np
import tf_keras as keras

from qtoolkit import datasets, export, rewrite, schemes, verify, zoo
from qtoolkit.algorithms import cle
from qtoolkit.callbacks import QuantizationCallback
from qtoolkit.pipeline import ptq

HEADING = "## Beyond the paper: CLE, bias correction and AdaRound"
CACHE = os.path.join("build", "algorithms", "mobilenet_v1_small_fmnist.keras")


def reference_model(path, dataset, epochs):
    """The model at `path`, or (default path only) zoo.mobilenet_v1_small trained once and cached."""
    if path is None:
        path = CACHE
        if not os.path.exists(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            model = zoo.mobilenet_v1_small((28, 28, 1), 10)
            zoo.train(model, dataset, epochs=epochs)
            model.save(path + ".tmp.keras")
            os.replace(path + ".tmp.keras", path)
    return keras.models.load_model(path, compile=False), path


def accuracy(outputs, y):
    return float(np.mean(np.asarray(outputs).argmax(1) == y))


def scheme(name, **algorithms):
    s = schemes.load(name)
    return s.replace(algorithms=algorithms) if algorithms else s


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None,
                        help="comma-separated trained .keras models or zoo:NAME reference models, one table each "
                             "(default: train and cache one)")
    parser.add_argument("--dataset", default="fashion_mnist")
    parser.add_argument("--train_epochs", type=int, default=3)
    parser.add_argument("--calibration_samples", type=int, default=500)
    parser.add_argument("--test_samples", type=int, default=10000)
    parser.add_argument("--qat_epochs", type=float, default=1.0, help="W4A8 QAT fine-tuning epochs (0: skip the row)")
    parser.add_argument("--write", default=None, help="markdown file whose section to replace")
    args = parser.parse_args()

    (x_train, y_train), (x_test, y_test) = datasets.load(args.dataset)
    x_cal = x_train[:args.calibration_samples]
    x_ver, y_ver = x_test[:args.test_samples], y_test[:args.test_samples]
    lines = [HEADING, "",
             f"Produced by `{' '.join(['python scripts/bench_algorithms.py', *sys.argv[1:]])}` ({args.dataset}, "
             f"{len(x_cal)} calibration images from the training set, accuracy of the exported int8 TFLite model in "
             f"the LiteRT interpreter on {len(x_ver)} test images; SQNR of the logits against the float model)."]
    for spec in (args.model.split(",") if args.model else [None]):
        if spec is not None and spec.startswith("zoo:"):
            model, path = zoo.load(spec[4:]), zoo.reference(spec[4:]).path
        else:
            model, path = reference_model(spec, args.dataset, args.train_epochs)
        lines += ["", *bench_model(model, path, args, x_train, y_train, x_cal, x_ver, y_ver)]
    table = "\n".join(lines) + "\n"
    print("\n" + table)
    if args.write:
        text = open(args.write, encoding="utf-8").read() if os.path.exists(args.write) else ""
        if HEADING in text:
            start = text.index(HEADING)
            end = text.find("\n## ", start + len(HEADING))
            text = text[:start] + table + (text[end + 1:] if end >= 0 else "")
        else:
            text = (text.rstrip() + "\n\n" if text.strip() else "") + table
        export.write_atomic(args.write, text.encode("utf-8"))


def bench_model(model, path, args, x_train, y_train, x_cal, x_ver, y_ver):
    """Every recipe on one model; returns its markdown subsection."""
    print(f"# {os.path.basename(path)}", flush=True)
    float_acc = accuracy(verify.predict_keras(model, x_ver), y_ver)

    # The float function CLE quantizes: ReLU6 of equalized pairs replaced by ReLU.
    rw = rewrite.rewrite(model, schemes.load("int8"))
    cle.equalize(rw, relu6="relu")
    relu_acc = accuracy(verify.predict_keras(keras.Model(rw.float_model.inputs, rw.float_model.outputs[0]), x_ver),
                        y_ver)

    rows = [
        ("W8A8 per-tensor, plain PTQ", scheme("int8_per_tensor"), "int8_per_tensor"),
        ("W8A8 per-tensor + BC (empirical), no CLE", scheme("int8_per_tensor", bias_correction="empirical"),
         "int8_per_tensor"),
        ("W8A8 per-tensor + CLE", scheme("int8_per_tensor", cle=True), "int8_per_tensor"),
        ("W8A8 per-tensor + CLE + BC (empirical)", scheme("int8_per_tensor", cle=True, bias_correction="empirical"),
         "int8_per_tensor"),
        ("W8A8 per-tensor + CLE + BC (analytic, data-free)",
         scheme("int8_per_tensor", cle=True, bias_correction="analytic"), "int8_per_tensor"),
        ("W8A8 per-channel (int8)", scheme("int8"), "int8"),
        ("W8A8 per-channel + CLE (ReLU6 -> ReLU)", scheme("int8", cle=True), "int8"),
        ("W8A8 per-channel + AdaRound + BC (empirical)", scheme("int8", adaround=True, adaround_iterations=500,
                                                                 bias_correction="empirical"), "int8"),
        ("int8_max_accuracy", scheme("int8_max_accuracy"), "int8"),
        ("W4A8 round-to-nearest PTQ", scheme("w4a8"), "w4a8"),
        ("W4A8 + bias correction (empirical)", scheme("w4a8", bias_correction="empirical"), "w4a8"),
        ("W4A8 + AdaRound + BC (empirical)", scheme("w4a8", adaround=True, bias_correction="empirical"), "w4a8"),
        ("W4A8 + CLE (ReLU6 -> ReLU) + AdaRound + BC", scheme("w4a8", cle=True, adaround=True,
                                                                bias_correction="empirical"), "w4a8"),
        ("w4a8_adaround", scheme("w4a8_adaround"), "w4a8"),
    ]
    results, plain_ops = [], {}
    for label, s, baseline in rows:
        t0 = time.perf_counter()
        r = ptq(model, x_cal, s, verification_data=x_ver, labels=y_ver, num_calibration_samples=len(x_cal),
                num_verification_samples=len(x_ver), progress=False)
        seconds = time.perf_counter() - t0
        c = r.comparisons["float vs TFLite"]
        if s.algorithms == schemes.Algorithms():  # the plain row of its group comes first
            plain_ops[baseline] = r.inspection.ops
        same_ops = r.inspection.ops == plain_ops.get(baseline)
        algo = r.seconds.get("algorithms", 0.0)
        per_layer = ""
        for note in r.notes:
            if "adaround" in note:
                per_layer = note
        results.append((label, c.candidate_accuracy, c.sqnr_db, same_ops, algo, seconds))
        print(f"{label}: accuracy {c.candidate_accuracy:.4f}, SQNR {c.sqnr_db:.1f} dB, same ops as plain "
              f"{baseline}: {same_ops}, algorithms {algo:.1f} s, total {seconds:.1f} s", flush=True)
        if per_layer:
            print("   ", per_layer[:600], flush=True)

    qat = None
    if args.qat_epochs > 0:
        tuned = keras.models.clone_model(model)  # before QAT touches anything
        tuned.set_weights(model.get_weights())
        t0 = time.perf_counter()
        qm = qtoolkit.quantize_model(model, "w4a8", calibration_data=x_train[:512])
        keras.utils.set_random_seed(0)
        qm.compile(keras.optimizers.Adam(1e-4), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        n = int(len(x_train) * min(args.qat_epochs, 1.0))
        epochs = max(1, int(round(args.qat_epochs)))
        # qtoolkit's recipe (as qtoolkit.qat.fine_tune): batch norm frozen half-way, the paper's schedule.
        freeze = QuantizationCallback(bn_freeze_step=epochs * -(-n // 128) // 2)
        qm.fit(x_train[:n], y_train[:n], batch_size=128, epochs=epochs, verbose=0, callbacks=[freeze])
        data, _ = qtoolkit.export_tflite(qm)
        qat = (accuracy(verify.LiteRTModel(data).predict(x_ver), y_ver), time.perf_counter() - t0)
        print(f"W4A8 QAT ({args.qat_epochs} epoch): accuracy {qat[0]:.4f} in {qat[1]:.0f} s", flush=True)
        # The same fine-tuning in float: what QAT's extra training alone gives.
        keras.utils.set_random_seed(0)
        tuned.compile(keras.optimizers.Adam(1e-4), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        tuned.fit(x_train[:n], y_train[:n], batch_size=128, epochs=max(1, int(round(args.qat_epochs))), verbose=0)
        qat = (*qat, accuracy(verify.predict_keras(tuned, x_ver), y_ver))
        print(f"float, same fine-tuning: accuracy {qat[2]:.4f}", flush=True)

    lines = [f"### {os.path.basename(path)}", "",
             f"Float model: **{100 * float_acc:.2f}%**. Float model with the ReLU6 of equalized pairs replaced by "
             f"ReLU (what CLE quantizes, see docs/algorithms.md): {100 * relu_acc:.2f}%.", "",
             "| recipe | accuracy | vs float (points) | SQNR (dB) | same ops as plain PTQ | algorithm time (s) |",
             "|---|---|---|---|---|---|",
             f"| float | {100 * float_acc:.2f} | 0.00 | - | - | - |"]
    for label, acc, sqnr, same, algo, _ in results:
        lines.append(f"| {label} | {100 * acc:.2f} | {100 * (acc - float_acc):+.2f} | {sqnr:.1f} | "
                     f"{'yes' if same else 'NO'} | {algo:.1f} |")
    if qat:
        lines.append(f"| W4A8 QAT ({args.qat_epochs:g} epoch fine-tuning, qtoolkit.quantize_model, batch norm frozen half-way) | "
                     f"{100 * qat[0]:.2f} | {100 * (qat[0] - float_acc):+.2f} | - | - | {qat[1]:.1f} (training) |")
        lines.append(f"| float, same fine-tuning (reference for the QAT row) | {100 * qat[2]:.2f} | "
                     f"{100 * (qat[2] - float_acc):+.2f} | - | - | - |")
    return lines


if __name__ == "__main__":
    main()
