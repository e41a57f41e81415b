"""Activation range methods side by side: the converter's PTQ, qtoolkit min/max, MSE and auto, on trained models.

For each model, with the same calibration samples: the SQNR (dB) of each int8 TFLite file against the float
Keras model on held-out samples (LiteRT interpreter), per output; top-1 accuracy where labels exist; and the
time of the calibration pass of each qtoolkit method (for "auto" it includes the choice of ranges) and of the
converter's whole conversion (its calibration is not separable).

Models: the six reference models of `qtoolkit.zoo` (calibration: the first 500 training images, or a shuffled
subset with --shuffle_seed; verification: the first 1,000 test images) and the six `qtoolkit.zoo.shapes`
models trained 2 epochs (calibration: their test inputs but the last 100; verification: the last 100).

    python scripts/bench_ranges.py                          # markdown table on stdout (docs/benchmarks.md)
    python scripts/bench_ranges.py --models resnet_fmnist,unet --shuffle_seed 1
    python scripts/bench_ranges.py --timing                 # added time of "auto": a small model and a
                                                            # 224x224 MobileNet (alpha 0.25), 200 random samples
"""

from __future__ import annotations

import argparse
import sys
import time

import qtoolkit  # noqa: F401  (TensorFlow's log level before TensorFlow is imported)
import numpy as np

from qtoolkit import datasets, export, loading, verify, zoo
from qtoolkit.pipeline import ptq
from qtoolkit.prepare import prepare
from qtoolkit.zoo import shapes

REFERENCE = ("mobilenet_v1_digits", "mobilenet_v2_digits", "resnet_digits", "mobilenet_v1_fmnist",
             "mobilenet_v2_fmnist", "resnet_fmnist")
METHODS = ("minmax", "mse", "auto")


def reference_case(name: str, shuffle_seed=None):
    model = zoo.load(name)
    (x_train, _), (x_test, y_test) = datasets.load(zoo.REFERENCE[name].dataset)
    if shuffle_seed is not None:
        x_train = x_train[np.random.default_rng(shuffle_seed).permutation(len(x_train))]
    return model, [x_train[:500]], [x_test[:1000]], [y_test[:1000]], ("classification",)


def shapes_case(name: str, split: str):
    model, task = shapes.trained(name)
    if split == "train":  # calibrate on training inputs, verify on every test input
        return model, [a[:500] for a in task.x_train], list(task.x_test), list(task.y_test), tuple(task.tasks)
    n_ver = 100
    cal, ver = [a[:-n_ver] for a in task.x_test], [a[-n_ver:] for a in task.x_test]
    return model, cal, ver, [y[-n_ver:] for y in task.y_test], tuple(task.tasks)


def difference(float_out, a, b, rounds=1000, seed=0) -> tuple[float, float]:
    """SQNR(a) - SQNR(b) in dB on the samples, and its standard error by a paired bootstrap over samples."""
    f = np.asarray(float_out, np.float64).reshape(len(float_out), -1)
    na = np.sum((f - np.asarray(a, np.float64).reshape(f.shape)) ** 2, axis=1)
    nb = np.sum((f - np.asarray(b, np.float64).reshape(f.shape)) ** 2, axis=1)
    db = lambda i: 10 * np.log10(nb[i].sum() / na[i].sum())  # noqa: E731  (the signal cancels)
    rng = np.random.default_rng(seed)
    boot = [db(rng.integers(0, len(f), len(f))) for _ in range(rounds)]
    return float(db(np.arange(len(f)))), float(np.std(boot))


def measure(name: str, shuffle_seed, methods=METHODS, split="test") -> dict:
    model, cal, ver, labels, tasks = (reference_case(name, shuffle_seed) if name in REFERENCE
                                      else shapes_case(name, split))
    graph = model if getattr(model, "inputs", None) else loading.trace(model)
    names = list(graph.output_names)
    x = lambda a: a if len(a) > 1 else a[0]  # noqa: E731
    listed = lambda o: o if isinstance(o, list) else [o]  # noqa: E731
    float_out = verify.predict_keras(model, x(ver), all_outputs=True)

    def representative():
        for i in range(len(cal[0])):
            yield [a[i:i + 1] for a in cal]

    t = time.perf_counter()
    theirs = export.converter_ptq_tflite(model, representative)
    seconds = {"converter": time.perf_counter() - t}
    outs = {"converter": listed(verify.LiteRTModel(theirs).predict(x(ver)))}
    notes = {}
    for method in methods:
        result = ptq(model, x(cal), verification_data=x(ver), num_verification_samples=len(ver[0]),
                     range_method=method, progress=False)
        outs[method] = listed(verify.LiteRTModel(result.tflite).predict(x(ver)))
        seconds[method] = result.calibration.seconds
        if result.calibration.selection is not None:
            notes[method] = result.calibration.selection.summary()
    per_method = {m: verify.compare_outputs(float_out, o, names, labels, tasks=list(tasks)) for m, o in outs.items()}
    last = methods[-1]
    diffs = {o: difference(float_out[i], outs[last][i], outs["converter"][i]) for i, o in enumerate(names)}
    return {"name": name, "outputs": names, "per_method": per_method, "seconds": seconds, "notes": notes,
            "methods": ("converter",) + tuple(methods), "diffs": diffs, "samples": len(ver[0])}


def row_lines(r: dict) -> list[str]:
    lines = []
    methods = r["methods"]
    for i, o in enumerate(r["outputs"]):
        cmps = [r["per_method"][m][o] for m in methods]
        sqnr = " | ".join(f"{c.sqnr_db:.2f}" for c in cmps)
        d, se = r["diffs"][o]
        acc = "- | -" if cmps[0].candidate_accuracy is None else (
            f"{cmps[0].reference_accuracy:.4f} | " + " / ".join(f"{c.candidate_accuracy:.4f}" for c in cmps))
        secs = " / ".join(f"{r['seconds'][m]:.1f}" for m in methods) if i == 0 else ""
        label = r["name"] if len(r["outputs"]) == 1 else f"{r['name']} ({o})"
        samples = r["samples"] if i == 0 else ""
        lines.append(f"| {label} | {samples} | {sqnr} | {d:+.2f} ± {se:.2f} | {acc} | {secs} |")
    return lines


def header(methods) -> str:
    m = ("converter",) + tuple(methods)
    return (f"| model (output) | verified on | {' | '.join(x + ' SQNR dB' if x == 'converter' else x for x in m)} "
            f"| {m[-1]} - converter dB ± s.e. | float accuracy | int8 accuracy {' / '.join(m)} "
            f"| seconds {' / '.join(m)} |\n|---|---:|{'---:|' * (len(m) + 2)}---|---|")


def timing():
    """Calibration seconds of minmax, mse and auto: a small trained model and a 224x224 MobileNet (alpha 0.25)."""
    import tf_keras

    tf_keras.utils.set_random_seed(0)
    big = tf_keras.applications.MobileNet(alpha=0.25, weights=None, input_shape=(224, 224, 3))
    x_big = np.random.default_rng(0).uniform(-1, 1, (400, 224, 224, 3)).astype(np.float32)
    small = zoo.load("mobilenet_v1_fmnist")
    (x_small, _), _ = datasets.load("fashion_mnist")
    print("| model | samples | quantizers | minmax s | mse s | auto s | auto - mse s | auto's choice |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for label, model, xs in (("mobilenet_v1_fmnist (28x28)", small, x_small[:400]),
                             ("MobileNet alpha 0.25 (224x224, random weights)", big, x_big)):
        secs, note, n_q = {}, "", 0
        for method in METHODS:
            cal = prepare(model, xs[:200], "int8", num_calibration_samples=200, verification_data=xs[200:210],
                          range_method=method, progress=False).calibration  # calibration only: no export
            secs[method] = cal.seconds
            n_q = len(cal.ranges)
            if cal.selection is not None:
                note = cal.selection.summary()
        print(f"| {label} | 200 | {n_q} | {secs['minmax']:.1f} | {secs['mse']:.1f} | {secs['auto']:.1f} "
              f"| {secs['auto'] - secs['mse']:.1f} | {note} |", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(REFERENCE + shapes.NAMES))
    parser.add_argument("--shuffle_seed", type=int, default=None,
                        help="calibrate the reference models on a shuffled subset of the training images")
    parser.add_argument("--shapes_split", choices=("test", "train"), default="test",
                        help="shapes models: calibrate on the test inputs but the last 100 and verify on those 100 "
                             "(test), or calibrate on 500 training inputs and verify on every test input (train)")
    parser.add_argument("--methods", default=",".join(METHODS), help="qtoolkit range methods to compare")
    parser.add_argument("--timing", action="store_true", help="only the added time of auto (see the docstring)")
    args = parser.parse_args()
    if args.timing:
        timing()
        return
    methods = tuple(args.methods.split(","))
    print(header(methods), flush=True)
    notes = []
    for name in args.models.split(","):
        r = measure(name, args.shuffle_seed, methods, args.shapes_split)
        print("\n".join(row_lines(r)), flush=True)
        notes += [f"- {name}: {n}" for n in r["notes"].values()]
    print("\n" + "\n".join(notes), file=sys.stderr)


if __name__ == "__main__":
    main()
