"""The regression config: its types (`Config`, `Case`) and `load_config`, which validates every key.

See the `qtoolkit.regress` docstring for the keys. Every error is a
`ConfigError` naming the file, the key and the fix.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Mapping, Optional

from qtoolkit.errors import ConfigError  # noqa: F401  (raised here; defined with the others)

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
        """`entry/scheme` (`+qat` for a QAT case): the case's name in reports and the baseline."""
        return f"{self.entry}/{self.label}{'+qat' if self.qat else ''}"


@dataclasses.dataclass(frozen=True)
class Config:
    """A validated config: its path, the baseline file (absolute, or None) and the cases in order."""

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

    top = schemes.read_yaml(path, ConfigError, "the regression config")
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
