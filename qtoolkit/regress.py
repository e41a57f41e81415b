"""The accuracy-regression job: int8 accuracy checked against float, thresholds and a baseline.

    python -m qtoolkit.regress --config configs/regression/quick.yaml [--output DIR] [--update_baseline]

A config (YAML) lists entries; each names a model (a path, or `zoo:NAME` for a
reference model of `qtoolkit.zoo`), a labeled data set, the schemes to run and
thresholds. For every entry x scheme ("case") the job quantizes the model (PTQ,
or QAT when the scheme asks for it), runs the float and the int8 TFLite models
with the LiteRT interpreter on the labeled evaluation samples and checks:

- `max_accuracy_drop`: float minus int8 top-1 accuracy, in points;
- `min_sqnr`: int8 vs float output SQNR, in dB;
- `max_simulation_gap`: |simulated (Keras fake-quant) minus int8 TFLite accuracy|, in points;
- `baseline_tolerance`: int8 accuracy may not fall more than this many points below
  the accuracy stored in the baseline file (the last accepted run).

It writes `report.json`, `report.md` and JUnit XML `report.xml` into `--output`,
and exits 1 when a case regresses, naming it and by how much. `--update_baseline`
stores this run's accuracies as the new baseline (after an accepted change).

Config keys (all validated; unknown keys are errors):

    baseline: quick.baseline.json          # relative to the config file
    defaults:                              # optional, apply to every entry
      calibration_samples: 500
      eval_samples: 1000
      thresholds: {max_accuracy_drop: 1.0, min_sqnr: 15, max_simulation_gap: 0.5, baseline_tolerance: 0.5}
    entries:
      - name: mobilenet_v1_fmnist
        model: zoo:mobilenet_v1_fmnist     # or a .keras/.h5/SavedModel path
        data: fashion_mnist                # digits | fashion_mnist | {calibration, inputs, labels[, train_inputs, train_labels]}
        schemes: [int8, {scheme: w4a8, qat: {epochs: 1, train_samples: 10000}, thresholds: {max_accuracy_drop: 3}}]
        thresholds: {max_accuracy_drop: 2.0}
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import sys
import time
import xml.etree.ElementTree as ET
from typing import Any, Mapping, Optional

import numpy as np
import yaml
from absl import app, flags

from qtoolkit import _env

THRESHOLDS = ("max_accuracy_drop", "min_sqnr", "max_simulation_gap", "baseline_tolerance")
DEFAULT_THRESHOLDS = {"max_accuracy_drop": 1.0, "min_sqnr": 15.0, "max_simulation_gap": 0.5,
                      "baseline_tolerance": 0.5}
_TOP_KEYS = ("baseline", "defaults", "entries", "description")
_DEFAULT_KEYS = ("calibration_samples", "eval_samples", "thresholds")
_ENTRY_KEYS = ("name", "model", "data", "schemes") + _DEFAULT_KEYS
_DATA_KEYS = ("calibration", "inputs", "labels", "train_inputs", "train_labels")
_SCHEME_KEYS = ("scheme", "qat", "thresholds")
_QAT_KEYS = ("epochs", "train_samples", "learning_rate", "batch_size", "seed")
_QAT_DEFAULTS = {"epochs": 1, "train_samples": 10000, "learning_rate": 1e-4, "batch_size": 64, "seed": 0}


class ConfigError(ValueError):
    """A regression config that is not valid; the message names the file, the key and the fix."""


@dataclasses.dataclass(frozen=True)
class Case:
    """One entry x scheme to run."""

    entry: str
    model: str
    data: Any  # a data set name or a mapping of .npy paths
    scheme: str  # a preset name or a YAML path
    label: str  # the scheme's own name
    qat: Optional[dict]
    calibration_samples: int
    eval_samples: int
    thresholds: dict

    @property
    def id(self) -> str:
        return f"{self.entry}/{self.label}{'+qat' if self.qat else ''}"


@dataclasses.dataclass(frozen=True)
class Config:
    path: str
    baseline: Optional[str]
    cases: tuple


def _check_keys(data: Any, allowed, where: str, source: str) -> Mapping:
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: {where} must be a mapping with keys {', '.join(allowed)}; got {data!r}")
    unknown = [k for k in data if k not in allowed]
    if unknown:
        raise ConfigError(f"{source}: unknown key {where}.{unknown[0]}; allowed keys are {', '.join(allowed)}")
    return data


def _number(value, where, source, minimum=None, integer=False):
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if integer:
        ok = ok and float(value).is_integer()
    if not ok or (minimum is not None and value < minimum):
        kind = "an integer" if integer else "a number"
        bound = "" if minimum is None else f" >= {minimum}"
        raise ConfigError(f"{source}: {where} must be {kind}{bound}, got {value!r}")
    return int(value) if integer else float(value)


def _thresholds(data, where, source, base):
    _check_keys(data, THRESHOLDS, where, source)
    out = dict(base)
    for key, value in data.items():
        out[key] = _number(value, f"{where}.{key}", source, minimum=None if key == "min_sqnr" else 0)
    return out


def load_config(path: str) -> Config:
    """Reads and validates a regression config.

    Raises:
      ConfigError: unreadable file, bad YAML, unknown key, bad value, unknown
        scheme, data set or reference model.
    """
    from qtoolkit import datasets, schemes, zoo

    try:
        with open(path, encoding="utf-8") as f:
            top = yaml.safe_load(f)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the regression config ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    _check_keys(top if top is not None else {}, _TOP_KEYS, "config", path)
    folder = os.path.dirname(os.path.abspath(path))
    defaults = _check_keys(top.get("defaults") or {}, _DEFAULT_KEYS, "defaults", path)
    base_thresholds = _thresholds(defaults.get("thresholds") or {}, "defaults.thresholds", path, DEFAULT_THRESHOLDS)
    entries = top.get("entries")
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"{path}: entries must be a non-empty list of entries (name, model, data, schemes)")
    cases, names = [], set()
    for i, entry in enumerate(entries):
        where = f"entries[{i}]"
        _check_keys(entry, _ENTRY_KEYS, where, path)
        missing = [k for k in ("name", "model", "data", "schemes") if k not in entry]
        if missing:
            raise ConfigError(f"{path}: {where} is missing {', '.join(missing)}")
        name = entry["name"]
        if not isinstance(name, str) or not name or name in names:
            raise ConfigError(f"{path}: {where}.name must be a unique non-empty string, got {name!r}")
        names.add(name)
        model = entry["model"]
        if not isinstance(model, str):
            raise ConfigError(f"{path}: {where}.model must be a path or zoo:NAME, got {model!r}")
        if model.startswith("zoo:"):
            if model[4:] not in zoo.REFERENCE:
                raise ConfigError(f"{path}: {where}.model: unknown reference model {model[4:]!r}; known: "
                                  f"{', '.join(zoo.REFERENCE)}")
        else:
            model = os.path.join(folder, model)
        data = entry["data"]
        if isinstance(data, str):
            if data not in datasets.NAMES:
                raise ConfigError(f"{path}: {where}.data: unknown data set {data!r}; use one of "
                                  f"{', '.join(datasets.NAMES)} or a mapping with keys {', '.join(_DATA_KEYS)}")
        else:
            _check_keys(data, _DATA_KEYS, f"{where}.data", path)
            for key in ("calibration", "inputs", "labels"):
                if not isinstance(data.get(key), str):
                    raise ConfigError(f"{path}: {where}.data.{key} must be the path of a .npy file")
            data = {k: os.path.join(folder, v) for k, v in data.items()}
        n_cal = _number(entry.get("calibration_samples", defaults.get("calibration_samples", 500)),
                        f"{where}.calibration_samples", path, 1, integer=True)
        n_eval = _number(entry.get("eval_samples", defaults.get("eval_samples", 1000)),
                         f"{where}.eval_samples", path, 1, integer=True)
        thresholds = _thresholds(entry.get("thresholds") or {}, f"{where}.thresholds", path, base_thresholds)
        scheme_list = entry["schemes"]
        if not isinstance(scheme_list, list) or not scheme_list:
            raise ConfigError(f"{path}: {where}.schemes must be a non-empty list")
        for j, item in enumerate(scheme_list):
            swhere = f"{where}.schemes[{j}]"
            item = {"scheme": item} if isinstance(item, str) else item
            _check_keys(item, _SCHEME_KEYS, swhere, path)
            scheme_name = item.get("scheme")
            if not isinstance(scheme_name, str):
                raise ConfigError(f"{path}: {swhere}.scheme must be a preset name or a .yaml path, got {scheme_name!r}")
            if scheme_name.endswith((".yaml", ".yml")) or os.sep in scheme_name:
                scheme_name = os.path.join(folder, scheme_name)
            try:
                scheme = schemes.load(scheme_name)
            except schemes.SchemeError as e:
                raise ConfigError(f"{path}: {swhere}.scheme: {e}") from None
            qat = item.get("qat")
            if qat is not None and qat is not False:
                qat = {} if qat is True else qat
                _check_keys(qat, _QAT_KEYS, f"{swhere}.qat", path)
                qat = {**_QAT_DEFAULTS, **qat}
                for key in ("epochs", "train_samples", "batch_size", "seed"):
                    qat[key] = _number(qat[key], f"{swhere}.qat.{key}", path, 0 if key == "seed" else 1, True)
                qat["learning_rate"] = _number(qat["learning_rate"], f"{swhere}.qat.learning_rate", path, 0)
                if scheme.activations is None:
                    raise ConfigError(f"{path}: {swhere}: QAT needs a scheme with activation quantization, "
                                      f"not {scheme_name!r}")
                if isinstance(data, Mapping) and not {"train_inputs", "train_labels"} <= set(data):
                    raise ConfigError(f"{path}: {swhere}: QAT needs {where}.data.train_inputs and train_labels")
            else:
                qat = None
            case_thresholds = _thresholds(item.get("thresholds") or {}, f"{swhere}.thresholds", path, thresholds)
            cases.append(Case(name, model, data, scheme_name, scheme.name, qat, n_cal, n_eval, case_thresholds))
    ids = [c.id for c in cases]
    dup = next((i for i in ids if ids.count(i) > 1), None)
    if dup:
        raise ConfigError(f"{path}: case {dup} appears twice")
    baseline = top.get("baseline")
    if baseline is not None and not isinstance(baseline, str):
        raise ConfigError(f"{path}: baseline must be the path of a JSON file, got {baseline!r}")
    return Config(path, None if baseline is None else os.path.join(folder, baseline), tuple(cases))


# ----------------------------------------------------------------------------- running a case


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
    return loaded.keras_model


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
    else:
        result = pipeline.ptq(model, cal, case.scheme, verification_data=x, labels=y,
                              num_calibration_samples=len(cal), num_verification_samples=len(x), progress=progress)
        data, path = result.tflite, result.path
        sim_cmp = result.comparisons.get("float vs simulated")  # the calibrated fake-quant Keras model
        simulated = None if sim_cmp is None else sim_cmp.candidate_accuracy
    int8 = verify.LiteRTModel(data)
    int8_out = int8.predict(x)
    int8_out = int8_out[0] if isinstance(int8_out, list) else int8_out
    cmp = verify.compare(float_out, int8_out, y)
    inspection = export.inspect(data)
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
    # Below 8 bits the simulated model has fewer activation levels than the int8 file can run: no gap to check.
    low_bit_activations = acts is not None and acts.bits < 8
    metrics["simulation_gap"] = (None if metrics["simulated_accuracy"] is None or low_bit_activations
                                 else 100.0 * abs(metrics["simulated_accuracy"] - metrics["int8_accuracy"]))
    metrics["seconds"] = time.perf_counter() - t0
    return metrics


def _qat(model, case: Case, cal, x_train, y_train):
    """Fine-tunes with qtoolkit QAT (`qat.fine_tune`); returns (QAT model, exported flatbuffer)."""
    from qtoolkit import qat

    q = case.qat
    order = np.random.default_rng(q["seed"]).permutation(len(x_train))[:q["train_samples"]]
    qm = qat.quantize_model(model, case.scheme, calibration_data=cal)
    qat.fine_tune(qm, x_train[order], y_train[order], epochs=q["epochs"], batch_size=q["batch_size"],
                  learning_rate=q["learning_rate"], seed=q["seed"])
    data, _ = qat.export_tflite(qm)
    return qm, data


# ----------------------------------------------------------------------------- checks and reports


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


def _pct(v):
    return "–" if v is None else f"{100 * v:.2f}"


def markdown(results: list[dict], title: str) -> str:
    failed = [r for r in results if not r["passed"]]
    lines = [f"# {title}", "",
             f"**{'FAILED' if failed else 'PASSED'}**: {len(results) - len(failed)} of {len(results)} cases "
             "passed (accuracies in %, measured with the LiteRT interpreter).", "",
             "| case | method | float | int8 | drop (pts) | SQNR (dB) | simulated | sim gap (pts) | baseline | "
             "status |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in results:
        m = r["metrics"]
        if m is None:
            lines.append(f"| {r['id']} | – | – | – | – | – | – | – | – | ERROR |")
            continue
        gap = "–" if m["simulation_gap"] is None else f"{m['simulation_gap']:.2f}"
        base = "–" if r["baseline"] is None else _pct(r["baseline"])
        lines.append(f"| {r['id']} | {m['method']} | {_pct(m['float_accuracy'])} | "
                     f"{_pct(m['int8_accuracy'])} | {m['accuracy_drop']:.2f} | {m['sqnr_db']:.1f} | "
                     f"{_pct(m['simulated_accuracy'])} | {gap} | {base} | "
                     f"{'pass' if r['passed'] else '**FAIL**'} |")
    if failed:
        lines += ["", "## Regressions", ""]
        for r in failed:
            for message in r["failures"]:
                lines.append(f"- `{r['id']}`: {message}")
    return "\n".join(lines) + "\n"


def junit(results: list[dict], name: str) -> bytes:
    """JUnit XML: one testsuite, one testcase per case, a <failure> per failed case."""
    failures = sum(1 for r in results if not r["passed"] and r["metrics"] is not None)
    errors = sum(1 for r in results if r["metrics"] is None)
    total = sum(r["seconds"] for r in results)
    suites = ET.Element("testsuites", name=name, tests=str(len(results)), failures=str(failures),
                        errors=str(errors), time=f"{total:.3f}")
    suite = ET.SubElement(suites, "testsuite", name=name, tests=str(len(results)), failures=str(failures),
                          errors=str(errors), skipped="0", time=f"{total:.3f}")
    for r in results:
        entry, _, scheme = r["id"].partition("/")
        tc = ET.SubElement(suite, "testcase", classname=f"regress.{entry}", name=scheme, time=f"{r['seconds']:.3f}")
        if r["metrics"] is None:
            ET.SubElement(tc, "error", message=r["failures"][0], type="error").text = r["failures"][0]
        elif not r["passed"]:
            ET.SubElement(tc, "failure", message="; ".join(r["failures"]), type="regression").text = \
                "\n".join(r["failures"])
        if r["metrics"] is not None:
            m = r["metrics"]
            ET.SubElement(tc, "system-out").text = (
                f"float {_pct(m['float_accuracy'])}% int8 {_pct(m['int8_accuracy'])}% "
                f"drop {m['accuracy_drop']:.2f} SQNR {m['sqnr_db']:.1f} dB")
    ET.indent(suites)
    return b'<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(suites, encoding="utf-8") + b"\n"


def _json_value(v):
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if isinstance(v, np.generic):
        return v.item()
    return v


def _clean(obj):
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_clean(v) for v in obj]
    return _json_value(obj)


def _read_baseline(path: Optional[str]) -> Optional[dict]:
    if path is None or not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: cannot read the baseline ({e}); fix it or rewrite it with --update_baseline")
    cases = data.get("cases") if isinstance(data, dict) else None
    if not isinstance(cases, dict) or not all(isinstance(v, dict) and isinstance(v.get("int8_accuracy"), float)
                                              for v in cases.values()):
        raise ConfigError(f"{path}: not a qtoolkit baseline (expected {{\"cases\": {{ID: {{\"int8_accuracy\": "
                          "x}}}}}}); rewrite it with --update_baseline")
    return cases


def run(config_path: str, output: str = "regression_report", update_baseline: bool = False,
        progress: bool = True, log=print) -> int:
    """Runs a regression config; returns the exit code (0 pass, 1 regression)."""
    from qtoolkit import calibrate, export, loading, rewrite, schemes, zoo

    config = load_config(config_path)
    baseline = None if update_baseline else _read_baseline(config.baseline)
    try:
        os.makedirs(output, exist_ok=True)
    except OSError as e:
        raise export.ExportError(f"cannot create the report folder {output} ({e.strerror}); choose another "
                                 "--output") from None
    export.check_writable(os.path.join(output, "report.json"))
    if update_baseline:
        if config.baseline is None:
            raise ConfigError(f"{config_path}: --update_baseline needs a `baseline:` file in the config")
        export.check_writable(config.baseline)
    known = (loading.ModelLoadError, calibrate.DataError, rewrite.UnquantizableLayersError,
             rewrite.UnsupportedModelError, export.ExportError, schemes.SchemeError, zoo.ReferenceUnavailable)
    results = []
    t0 = time.perf_counter()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(config.cases), desc="regression", unit="case", file=sys.stderr)
    for case in config.cases:
        if bar is not None:
            bar.set_postfix_str(case.id)
        start = time.perf_counter()
        try:
            metrics = evaluate_case(case)
        except known as e:
            metrics, checks = None, []
            failures = [f"error: {e}"]
        else:
            checks = check(case, metrics, baseline)
            failures = [c["message"] for c in checks if not c["passed"]]
        results.append({"id": case.id, "entry": case.entry, "scheme": case.scheme, "qat": case.qat,
                        "model": case.model, "thresholds": case.thresholds, "metrics": metrics, "checks": checks,
                        "baseline": None if baseline is None or case.id not in baseline
                        else baseline[case.id]["int8_accuracy"],
                        "passed": metrics is not None and not failures, "failures": failures,
                        "seconds": time.perf_counter() - start})
        if bar is not None:
            bar.update(1)
        elif log:
            log(f"{case.id}: {'pass' if results[-1]['passed'] else 'FAIL'}")
    if bar is not None:
        bar.close()
    failed = [r for r in results if not r["passed"]]
    title = f"qtoolkit accuracy regression: {os.path.basename(config_path)}"
    report = {"config": os.path.abspath(config_path), "baseline": config.baseline, "passed": not failed,
              "seconds": time.perf_counter() - t0, "cases": results}
    export.write_atomic(os.path.join(output, "report.json"),
                        (json.dumps(_clean(report), indent=1) + "\n").encode())
    md = markdown(results, title)
    export.write_atomic(os.path.join(output, "report.md"), md.encode())
    export.write_atomic(os.path.join(output, "report.xml"), junit(results, title))
    if log:
        log(md)
    if update_baseline:
        measured = {r["id"]: {"int8_accuracy": r["metrics"]["int8_accuracy"]} for r in results if r["metrics"]}
        export.write_atomic(config.baseline, (json.dumps({"config": os.path.basename(config_path),
                                                          "cases": measured}, indent=1, sort_keys=True)
                                              + "\n").encode())
        if log:
            log(f"baseline written: {config.baseline} ({len(measured)} cases)")
    if failed and log:
        for r in failed:
            for message in r["failures"]:
                print(f"REGRESSION {r['id']}: {message}", file=sys.stderr)
    if log:
        log(f"reports: {os.path.join(output, 'report.md')}, report.json, report.xml")
    return 1 if failed else 0


# ----------------------------------------------------------------------------- CLI

def _define_flags():
    """Defined only when run as a program: importing qtoolkit.regress beside qtoolkit.convert must not clash."""
    flags.DEFINE_string("config", None, "Regression config (YAML), e.g. configs/regression/quick.yaml.")
    flags.DEFINE_string("output", "regression_report", "Folder for report.json, report.md and report.xml (JUnit).")
    flags.DEFINE_bool("update_baseline", False,
                      "Store this run's int8 accuracies as the baseline (after an accepted change).")
    flags.DEFINE_bool("progress", True, "Show a progress bar.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    f = flags.FLAGS
    if not f.config:
        raise app.UsageError("missing required flag --config (e.g. --config configs/regression/quick.yaml)")
    import logging

    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.ERROR)
    logging.getLogger("tensorflow").setLevel(logging.ERROR)
    try:
        with _env.quiet_native_stderr():
            return run(f.config, f.output, f.update_baseline, f.progress)
    except Exception as e:  # noqa: BLE001 - known errors become one line; others keep their traceback
        from qtoolkit import export

        if not isinstance(e, (ConfigError, export.ExportError)):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


def entry_point():
    _define_flags()
    app.run(main)


if __name__ == "__main__":
    entry_point()
