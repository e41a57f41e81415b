"""AdaRound's cost and accuracy (issue 23): `int8` vs `int8_max_accuracy` through `qtoolkit.ptq`.

    python scripts/bench_adaround.py --part speed --json after.json       # MobileNet-v1 0.25 at 224, 200 samples
    python scripts/bench_adaround.py --part accuracy --json after.json    # trained reference models
    # the code before, from a checkout of an older commit (same script, same machine, back to back):
    git worktree add /tmp/adaround_before <commit>
    (cd /tmp/adaround_before && PYTHONPATH=. python /path/to/scripts/bench_adaround.py --json before.json)
    python scripts/bench_adaround.py --compare before.json after.json    # the markdown table

speed: tf_keras.applications.MobileNet(alpha=0.25, input_shape=(224, 224, 3),
weights=None) (no download here: random weights, batch norms given random
statistics so that folding and AdaRound see non-trivial channels), 200 uniform
random calibration samples, 100 verification samples; wall time of the whole
`ptq` run and of its algorithms, SQNR of the TFLite logits against float.
accuracy: zoo reference models on their test sets (LiteRT accuracy and SQNR).
"""

from __future__ import annotations

import argparse
import json
import time

import qtoolkit  # noqa: F401  (TensorFlow's log level before TensorFlow is imported)
import numpy as np
import tf_keras as keras

from qtoolkit import datasets, zoo
from qtoolkit.pipeline import ptq

ZOO = ("mobilenet_v1_fmnist", "mobilenet_v2_digits")


def mobilenet_224(seed=0):
    keras.utils.set_random_seed(seed)
    model = keras.applications.MobileNet(alpha=0.25, input_shape=(224, 224, 3), weights=None)
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            g, b, m, v = layer.get_weights()
            layer.set_weights([rng.uniform(0.5, 1.5, g.shape), rng.normal(0, 0.2, b.shape),
                               rng.normal(0, 0.2, m.shape), rng.uniform(0.5, 2.0, v.shape)])
    return model


def run(model, x_cal, x_ver, y_ver, scheme):
    t0 = time.perf_counter()
    r = ptq(model, x_cal, scheme, verification_data=x_ver, labels=y_ver, num_calibration_samples=len(x_cal),
            num_verification_samples=len(x_ver), progress=False)
    c = r.comparisons["float vs TFLite"]
    return {"seconds": time.perf_counter() - t0, "algorithms": r.seconds.get("algorithms", 0.0),
            "sqnr_db": c.sqnr_db, "accuracy": c.candidate_accuracy}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("speed", "accuracy", "both"), default="both")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--test_samples", type=int, default=2000)
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--compare", nargs=2, metavar=("BEFORE", "AFTER"), help="print the markdown table")
    args = parser.parse_args()
    if args.compare:
        return compare(*args.compare)
    print("qtoolkit from", qtoolkit.__file__, flush=True)
    results = {}
    if args.part in ("speed", "both"):
        model = mobilenet_224()
        rng = np.random.default_rng(1)
        x = rng.uniform(-1, 1, (300, 224, 224, 3)).astype(np.float32)
        for repeat in range(args.repeats):
            for scheme in ("int8", "int8_max_accuracy"):
                out = run(model, x[:200], x[200:], None, scheme)
                results.setdefault(f"mobilenet_0.25_224/{scheme}", []).append(out)
                print(f"mobilenet_0.25_224 {scheme} #{repeat}: {out}", flush=True)
    if args.part in ("accuracy", "both"):
        for name in ZOO:
            (x_train, _), (x_test, y_test) = datasets.load(zoo.reference(name).dataset)
            n = min(args.test_samples, len(x_test))
            for scheme in ("int8", "int8_max_accuracy"):
                out = run(zoo.load(name), x_train[:500], x_test[:n], y_test[:n], scheme)
                results.setdefault(f"{name}/{scheme}", []).append(out)
                print(f"{name} {scheme}: {out}", flush=True)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=1)


def compare(before_path, after_path):
    before, after = (json.load(open(p, encoding="utf-8")) for p in (before_path, after_path))
    print("| model / scheme | ptq time before (s) | after (s) | algorithms before (s) | after (s) | speed-up "
          "(algorithms) | SQNR before / after (dB) | accuracy before / after (%) |")
    print("|---|---|---|---|---|---|---|---|")
    for key in after:
        if key not in before:
            continue
        b, a = before[key], after[key]
        mean = lambda rows, k: float(np.mean([r[k] for r in rows]))  # noqa: E731
        speed = mean(b, "algorithms") / mean(a, "algorithms") if mean(a, "algorithms") > 0 else float("nan")
        acc = " / ".join("-" if r[0]["accuracy"] is None else f"{100 * mean(r, 'accuracy'):.2f}" for r in (b, a))
        print(f"| {key} | {' / '.join(f'{r[k]:.0f}' for r in b for k in ['seconds'])} | "
              f"{' / '.join(f'{r[k]:.0f}' for r in a for k in ['seconds'])} | "
              f"{' / '.join(f'{r[k]:.1f}' for r in b for k in ['algorithms'])} | "
              f"{' / '.join(f'{r[k]:.1f}' for r in a for k in ['algorithms'])} | "
              f"{speed:.1f}x | {mean(b, 'sqnr_db'):.1f} / {mean(a, 'sqnr_db'):.1f} | {acc} |")


if __name__ == "__main__":
    main()
