"""Running one case: its data, its model, PTQ or QAT, the float and int8 TFLite measurements, and its checks.

`evaluate_case` measures (accuracies as fractions, drops and gaps in points);
`check` compares the measurements with the case's thresholds and the baseline.
"""

from __future__ import annotations

import functools
import time
from typing import Optional

import numpy as np

from qtoolkit.regress.config import Case


@functools.lru_cache(maxsize=4)
def _dataset(name: str):
    from qtoolkit import datasets

    return datasets.load(name)


def _arrays(case: Case):
    """(calibration inputs, eval inputs, eval labels, train inputs, train labels) for a case."""
    from qtoolkit import calibrate

    if isinstance(case.data, str):
        (x_train, y_train), (x_test, y_test) = _dataset(case.data)
        # Calibrate on training images (never the evaluation ones); a fixed shuffled subset.
        order = np.random.default_rng(0).permutation(len(x_train))
        cal = x_train[order[:case.calibration_samples]]
        return cal, x_test[:case.eval_samples], y_test[:case.eval_samples], x_train, y_train

    def npy(key):
        path = case.data[key]
        try:
            return np.load(path, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise calibrate.DataError(f"{path}: cannot read {key} of entry {case.entry} ({e})") from None

    x, y = npy("inputs")[:case.eval_samples], npy("labels")[:case.eval_samples]
    if len(x) != len(y):
        raise calibrate.DataError(f"entry {case.entry}: {len(x)} inputs but {len(y)} labels")
    train = (npy("train_inputs"), npy("train_labels")) if "train_inputs" in case.data else (None, None)
    return npy("calibration")[:case.calibration_samples], x, y, *train


def _load_model(spec: str):
    from qtoolkit import loading, zoo

    if spec.startswith("zoo:"):
        return zoo.load(spec[4:])
    loaded = loading.load_model(spec)
    if loaded.keras_model is None:
        raise loading.ModelLoadError(f"{spec}: the regression job needs a Keras model (SavedModel with Keras "
                                     "metadata, .keras or .h5)")
    return loaded.reference_model  # a Keras 3 file: the Keras 3 model itself (PTQ and QAT take it as it is)


def _accuracy(outputs, labels) -> float:
    return float(np.mean(np.asarray(outputs).reshape(len(labels), -1).argmax(1) == np.asarray(labels)))


def evaluate_case(case: Case, progress: bool = False) -> dict:
    """Quantizes and measures one case; returns its metrics (accuracies as fractions)."""
    from qtoolkit import export, pipeline, schemes, verify

    t0 = time.perf_counter()
    model = _load_model(case.model)
    cal, x, y, x_train, y_train = _arrays(case)
    float_tfl = verify.LiteRTModel(export.float_tflite(model))
    float_out = float_tfl.predict(x)
    float_out = float_out[0] if isinstance(float_out, list) else float_out
    if case.qat:
        sim_model, data = _qat(model, case, cal, x_train, y_train)
        simulated = _accuracy(verify.predict_keras(sim_model, x), y)
        path = "QAT"
        int8_out = verify.LiteRTModel(data).predict(x)
        int8_out = int8_out[0] if isinstance(int8_out, list) else int8_out
        inspection = export.inspect(data)
    else:
        result = pipeline.ptq(model, cal, case.scheme, verification_data=x, labels=y,
                              num_calibration_samples=len(cal), num_verification_samples=len(x), progress=progress)
        data, path = result.tflite, result.path
        sim_cmp = result.comparisons.get("float vs simulated")  # the calibrated fake-quant Keras model
        simulated = None if sim_cmp is None else sim_cmp.candidate_accuracy
        int8_out, inspection = result.outputs["tflite"], result.inspection  # ptq measured these: not run again
    cmp = verify.compare(float_out, int8_out, y)
    acts = schemes.load(case.scheme).activations
    metrics = {
        "method": "QAT" if case.qat else ("PTQ, weights only" if acts is None else "PTQ"),
        "path": path,
        "float_accuracy": cmp.reference_accuracy,
        "int8_accuracy": cmp.candidate_accuracy,
        "accuracy_drop": 100.0 * (cmp.reference_accuracy - cmp.candidate_accuracy),
        "sqnr_db": cmp.sqnr_db,
        "simulated_accuracy": simulated,
        "eval_samples": int(len(y)),
        "size_bytes": len(data),
        "fully_quantized": inspection.fully_quantized,
    }
    # Below 8 bits too: the file holds only the trained levels (export._activations_at_least_8_bits).
    metrics["simulation_gap"] = (None if metrics["simulated_accuracy"] is None
                                 else 100.0 * abs(metrics["simulated_accuracy"] - metrics["int8_accuracy"]))
    metrics["seconds"] = time.perf_counter() - t0
    return metrics


def _qat(model, case: Case, cal, x_train, y_train):
    """Fine-tunes with qtoolkit QAT (`callbacks.fine_tune`); returns (QAT model, exported flatbuffer)."""
    from qtoolkit import callbacks, qat

    q = case.qat
    order = np.random.default_rng(q["seed"]).permutation(len(x_train))[:q["train_samples"]]
    qm = qat.quantize_model(model, case.scheme, calibration_data=cal)
    callbacks.fine_tune(qm, x_train[order], y_train[order], epochs=q["epochs"], batch_size=q["batch_size"],
                        learning_rate=q["learning_rate"], seed=q["seed"])
    data, _ = qat.export_tflite(qm)
    return qm, data


def check(case: Case, metrics: dict, baseline: Optional[dict]) -> list[dict]:
    """The case's checks: name, measured value, limit, passed, and a sentence when it failed."""
    t = case.thresholds
    checks = []

    def add(name, value, limit, passed, message):
        checks.append({"name": name, "value": value, "limit": limit, "passed": bool(passed),
                       "message": None if passed else message})

    drop = metrics["accuracy_drop"]
    add("max_accuracy_drop", drop, t["max_accuracy_drop"], drop <= t["max_accuracy_drop"] + 1e-9,
        f"int8 accuracy {100 * metrics['int8_accuracy']:.2f}% is {drop:.2f} points below float "
        f"{100 * metrics['float_accuracy']:.2f}% (limit {t['max_accuracy_drop']:g})")
    sqnr = metrics["sqnr_db"]
    add("min_sqnr", sqnr, t["min_sqnr"], sqnr >= t["min_sqnr"],
        f"output SQNR {sqnr:.1f} dB is below {t['min_sqnr']:g} dB")
    gap = metrics["simulation_gap"]
    if gap is not None:
        add("max_simulation_gap", gap, t["max_simulation_gap"], gap <= t["max_simulation_gap"] + 1e-9,
            f"simulated accuracy {100 * metrics['simulated_accuracy']:.2f}% and int8 TFLite accuracy "
            f"{100 * metrics['int8_accuracy']:.2f}% differ by {gap:.2f} points "
            f"(limit {t['max_simulation_gap']:g})")
    if baseline is not None and case.id in baseline:
        ref = baseline[case.id]["int8_accuracy"]
        below = 100.0 * (ref - metrics["int8_accuracy"])
        add("baseline_tolerance", below, t["baseline_tolerance"], below <= t["baseline_tolerance"] + 1e-9,
            f"int8 accuracy {100 * metrics['int8_accuracy']:.2f}% is {below:.2f} points below the baseline "
            f"{100 * ref:.2f}% (tolerance {t['baseline_tolerance']:g})")
    return checks
