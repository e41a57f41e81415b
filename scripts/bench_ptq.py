"""qtoolkit PTQ vs the TFLite converter's own full-integer PTQ, side by side.

For each model, with the same calibration samples: conversion time, size,
whether every op is int8, SQNR / top-1 agreement / accuracy against the float
model (LiteRT interpreter, held-out samples), and the latency of the float,
converter-int8 and qtoolkit-int8 flatbuffers (LiteRT, batch 1, 1 and 2
threads, median of --runs invokes after warm-up, the three models measured in
alternating rounds), XNNPACK partitions and the ops left outside the delegate,
all measured in this one run.

    python scripts/bench_ptq.py                      # every model, markdown table on stdout
    python scripts/bench_ptq.py --models fmnist_mobilenet --calibration_samples 1000
    python scripts/bench_ptq.py --memory             # peak RSS vs calibration samples streamed (.npy, TFRecord, tf.data)
    python scripts/bench_ptq.py --models InceptionV3 --seeds 1,2,3,4 --runs 10   # SQNR over seeded models
    python scripts/bench_ptq.py --keras 2,3          # each model built with tf_keras and with Keras 3

Keras applications models are built with weights=None (no downloads here) at
reduced resolution and are fed uniform random inputs: they show coverage,
size and speed; accuracy claims come from the Fashion-MNIST model.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import time

import qtoolkit  # noqa: F401  (TensorFlow's log level before TensorFlow is imported)
import numpy as np
import tensorflow as tf
import keras as keras3  # Keras 3, for --keras 3
import tf_keras as keras

from qtoolkit import datasets, export, runtime, verify, zoo
from qtoolkit.pipeline import ptq

APPS = {"MobileNet": 96, "MobileNetV2": 96, "MobileNetV3Small": 96, "MobileNetV3Large": 96, "ResNet50": 64,
        "EfficientNetB0": 96, "InceptionV3": 96}
CACHE = os.path.join("build", "bench")


def fashion_model(keras_version="2"):
    """The MobileNet-v1-style reference model on Fashion-MNIST (qtoolkit.zoo, committed weights)."""
    (x_train, _), (x_test, y_test) = datasets.load("fashion_mnist")
    return zoo.load("mobilenet_v1_fmnist", keras_version), x_train, x_test, y_test


def app_model(name, keras_version="2", seed=None):
    size = APPS[name]
    k = keras if keras_version == "2" else keras3
    k.utils.set_random_seed(seed or 0)  # the same weights for the Keras 2 and the Keras 3 build
    model = getattr(k.applications, name)(weights=None, input_shape=(size, size, 3),
                                          classifier_activation=None)
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (1200, size, size, 3)).astype(np.float32)
    return model, x[:1000], x[1000:], None


def bench(name, n_cal, n_ver, runs, keras_version="2", seed=None):
    model, pool, x_ver, y_ver = (fashion_model(keras_version) if name == "fmnist_mobilenet"
                                 else app_model(name, keras_version, seed))
    calib = pool[:n_cal]
    x_ver = x_ver[:n_ver]
    y_ver = None if y_ver is None else y_ver[:n_ver]
    rows = {}
    start = time.perf_counter()
    ours = ptq(model, calib, "int8", verification_data=x_ver, labels=y_ver, progress=False)
    t_ours = time.perf_counter() - start - ours.seconds["verify"]
    start = time.perf_counter()
    theirs = export.converter_ptq_tflite(model, lambda: ([calib[i:i + 1]] for i in range(len(calib))))
    t_theirs = time.perf_counter() - start
    flt = export.float_tflite(model)
    ref = model.predict(x_ver, batch_size=64, verbose=0)
    their_cmp = verify.compare(ref, verify.LiteRTModel(theirs).predict(x_ver), y_ver)
    # Alternating rounds: the three models share the machine's slow and fast phases alike.
    lat = {}
    for t in (1, 2):
        ms = runtime.alternate_median_ms({"float": flt, "converter": theirs, "qtoolkit": ours.tflite},
                                         threads=t, runs=runs)
        lat.update({(kind, t): v for kind, v in ms.items()})
    float_partitions = runtime.delegation(flt).partitions
    for tool, data, cmp, secs in (("converter PTQ", theirs, their_cmp, t_theirs),
                                  ("qtoolkit", ours.tflite, ours.comparisons["float vs TFLite"], t_ours)):
        insp = export.inspect(data)
        deleg = runtime.delegation(data)
        outside = sorted({op for op, _ in deleg.outside})
        key = "converter" if tool == "converter PTQ" else "qtoolkit"
        rows[tool] = {
            "convert s": f"{secs:.1f}", "size KiB": f"{len(data) / 1024:.0f}",
            "fully int8": "yes" if insp.fully_quantized else f"no ({len(insp.float_ops)} float ops)",
            "per-channel": f"{sum(w.per_channel for w in insp.weights)}/{len(insp.weights)}",
            "SQNR dB": f"{cmp.sqnr_db:.2f}", "top-1 agree": f"{cmp.top1_agreement:.4f}",
            "accuracy (float)": "-" if cmp.candidate_accuracy is None else
            f"{cmp.candidate_accuracy:.4f} ({cmp.reference_accuracy:.4f})",
            "int8/float latency 1T": f"{lat[(key, 1)] / lat[('float', 1)]:.2f}",
            "int8/float latency 2T": f"{lat[(key, 2)] / lat[('float', 2)]:.2f}",
            "XNNPACK partitions (float)": f"{deleg.partitions} ({float_partitions})",
            "ops outside XNNPACK": f"{len(deleg.outside)} {'/'.join(outside)}".strip(),
            "latency / converter's 1T": f"{lat[(key, 1)] / lat[('converter', 1)]:.2f}",
        }
    gap = ours.comparisons["simulated vs TFLite"].max_error_steps
    return rows, gap, lat, ours.comparisons["float vs TFLite"].sqnr_db - their_cmp.sqnr_db


SOURCES = {  # how a child process hands the calibration data to ptq, streamed
    "npy": "'{cache}/fmnist_calib.npy'",
    "tfrecord": "'{cache}/fmnist_calib.tfrecord'",
    "tf.data": ("tf.data.Dataset.from_generator(lambda: (f[i:i + 64] for i in range(0, len(f), 64)), "
                "output_signature=tf.TensorSpec((None, 28, 28, 1), tf.float32))"),
}


def memory(samples, sources):
    """Peak RSS of a qtoolkit conversion (child process) per data source and number of calibration samples.

    VmHWM, not ru_maxrss: Linux carries ru_maxrss over fork+exec, so a child
    of this (large) process would report the parent's peak.  The default range
    method ("auto") keeps its held-out samples (at most 128) in memory; the
    verification samples (100) are collected too; everything else streams.
    A row "shard 1/2" is the second of two shards of the stream (calibration in
    parts: it reads and skips the first half, observes the second, writes its part).
    """
    print("| data source | calibration samples | peak RSS MiB | calibrate s |\n|---|---:|---:|---:|")
    model = zoo.reference("mobilenet_v1_fmnist").path
    for source, n, shard in [(src, n, None) for src in sources for n in samples] + \
            [(src, samples[-1], "1/2") for src in sources if src == "tfrecord"]:
        data = SOURCES[source].format(cache=CACHE)
        call = (f"prepare.prepare('{model}', {data}, 'int8', num_calibration_samples={n}, progress=False, "
                f"calibration_shard='{shard}').seconds['calibrate']" if shard else
                f"ptq('{model}', {data}, 'int8', num_calibration_samples={n}, num_verification_samples=100, "
                "progress=False).calibration.seconds")
        code = ("import qtoolkit, sys; sys.argv=['x']; import tensorflow as tf; "
                "from qtoolkit import prepare; from qtoolkit.pipeline import ptq; "
                f"from qtoolkit.calibrate.data import NpyFile; f = NpyFile('{CACHE}/fmnist_calib.npy'); "
                f"secs = {call}; "
                "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]; "
                "print(int(hwm) / 1024, secs)")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        if out.returncode:
            raise SystemExit(f"{source} {n}: {out.stderr.strip().splitlines()[-1]}")
        rss, secs = out.stdout.strip().splitlines()[-1].split()[-2:]
        label = source + (f", shard {shard}" if shard else "")
        print(f"| {label} | {n} | {float(rss):.0f} | {float(secs):.1f} |", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="fmnist_mobilenet," + ",".join(APPS))
    parser.add_argument("--sizes", default="",
                        help="input sizes overriding the reduced defaults, e.g. InceptionV3=299 (its native size)")
    parser.add_argument("--calibration_samples", type=int, default=500)
    parser.add_argument("--verification_samples", type=int, default=2000)
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--memory", action="store_true", help="measure peak memory vs calibration samples")
    parser.add_argument("--memory_samples", type=lambda t: [int(v) for v in t.split(",")], default=[1000, 3000, 10000],
                        help="--memory: calibration sample counts (comma-separated)")
    parser.add_argument("--memory_sources", default="npy,tfrecord,tf.data",
                        help=f"--memory: data sources, of {', '.join(SOURCES)}")
    parser.add_argument("--seeds", default="",
                        help="comma-separated seeds: build each Keras applications model once per seed (seeded "
                             "random weights) and summarize qtoolkit's SQNR minus the converter's over them")
    parser.add_argument("--keras", default="2", help="2 (tf_keras), 3 (Keras 3, `import keras`) or 2,3: each "
                        "model built with that Keras (the same weights), rows side by side")
    args = parser.parse_args()
    versions = args.keras.split(",")
    if not set(versions) <= {"2", "3"}:
        parser.error(f"--keras: expected 2, 3 or 2,3, got {args.keras!r}")
    for item in filter(None, args.sizes.split(",")):
        name, _, size = item.partition("=")
        if name not in APPS or not size.isdigit():
            parser.error(f"--sizes: expected MODEL=PIXELS with MODEL one of {', '.join(APPS)}, got {item!r}")
        APPS[name] = int(size)
    if args.memory:
        from qtoolkit import calibrate

        model, x_train, _, _ = fashion_model()
        os.makedirs(CACHE, exist_ok=True)
        n = max(args.memory_samples) + 200
        np.save(os.path.join(CACHE, "fmnist_calib.npy"), x_train[:n])
        calibrate.write_records(os.path.join(CACHE, "fmnist_calib.tfrecord"), {model.inputs[0].name: x_train[:n]})
        memory(args.memory_samples, args.memory_sources.split(","))  # in fresh processes
        return
    print(f"# {tf.__version__=}, calibration samples {args.calibration_samples}, "
          f"{os.cpu_count()} CPUs\n")
    header = None
    seeds = [int(s) for s in args.seeds.split(",") if s] or [None]
    differences = {}
    for name in args.models.split(","):
        if name in APPS:
            print(f"<!-- {name} at {APPS[name]}x{APPS[name]} -->")
        for seed, version in [(s, v) for s in seeds for v in versions]:
            label = (name if seed is None else f"{name} seed {seed}") + (" (Keras 3)" if version == "3" else "")
            rows, gap, lat, sqnr_gain = bench(name, args.calibration_samples, args.verification_samples, args.runs,
                                              version, seed)
            if header is None:
                header = ["model", "tool", *next(iter(rows.values()))]
                print("| " + " | ".join(header) + " |")
                print("|" + "---|" * len(header))
            for tool, row in rows.items():
                print(f"| {label} | {tool} | " + " | ".join(row.values()) + " |", flush=True)
            print(f"<!-- {label}: simulation gap {gap:.2f} output steps; float latency "
                  f"{lat[('float', 1)]:.2f} ms (1T) {lat[('float', 2)]:.2f} ms (2T) -->", flush=True)
            differences.setdefault(name + (" (Keras 3)" if version == "3" else ""), []).append(sqnr_gain)
    if len(seeds) > 1:
        print("\n| model | seeds | SQNR qtoolkit - converter, dB: mean | standard error | min | max |")
        print("|---|---|---|---|---|---|")
        for name, d in differences.items():
            d = np.array(d)
            print(f"| {name} | {len(d)} | {d.mean():+.2f} | {d.std(ddof=1) / np.sqrt(len(d)):.2f} | "
                  f"{d.min():+.2f} | {d.max():+.2f} |")


if __name__ == "__main__":
    main()
