"""Quantization schemes: how weights and activations are quantized.

A scheme is plain data (frozen dataclasses), loaded from YAML files in
`configs/` and validated; presets are the files `configs/<name>.yaml`.

    >>> from qtoolkit import schemes
    >>> s = schemes.load("int8")                       # a preset by name
    >>> s.weights.granularity, s.activations.bits
    ('per_channel', 8)
    >>> s2 = schemes.load("my_scheme.yaml")            # or a file  # doctest: +SKIP
    >>> schemes.QuantScheme.from_dict(s.to_dict()) == s
    True
    >>> s.replace(layers={"float_types": ["LayerNormalization"]}).layers.float_types
    ('LayerNormalization',)

Every error is a `SchemeError` naming the file, the key and what is allowed.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Mapping, Optional

import yaml

from qtoolkit.quantizers import MAX_BITS, MIN_BITS
from qtoolkit.errors import SchemeError  # noqa: F401  (raised here; defined with the others)

GRANULARITIES = ("per_tensor", "per_channel")
RANGE_METHODS = ("minmax", "ema", "percentile", "mse", "entropy", "auto")
CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
_PACKAGED_CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")


@dataclasses.dataclass(frozen=True)
class WeightQuant:
    """How weights are quantized (the paper's recommendation by default).

    Attributes:
      bits: 2 to 16.
      symmetric: zero-point 0 (TFLite requires it for int8 weights).
      narrow_range: drop the lowest code ([-127, 127] for int8).
      granularity: "per_channel" (one range per output channel) or "per_tensor".
    """

    bits: int = 8
    symmetric: bool = True
    narrow_range: bool = True
    granularity: str = "per_channel"


@dataclasses.dataclass(frozen=True)
class ActivationQuant:
    """How activations are quantized and how their ranges are calibrated.

    Attributes:
      bits: 2 to 16 (16 means TFLite's int16x8 mode, symmetric).
      symmetric: zero-point 0.
      narrow_range: drop the lowest code.
      granularity: only "per_tensor" (TFLite has no per-channel activations).
      method: range method, one of RANGE_METHODS: "minmax", "ema", "percentile", "mse", "entropy"
        (calibrate/observers.py) or "auto" (the default, as in the `int8` preset): per tensor the min/max
        or the MSE range, whichever gives the lower error of the model's outputs on held-out calibration
        samples (calibrate/select.py; measured in docs/benchmarks.md).
      ema_decay: decay of the moving average of batch min/max ("ema").
      percentile: two-sided percentile kept ("percentile"), e.g. 99.99.
      num_bins: histogram bins ("percentile", "mse", "entropy", "auto").
    """

    bits: int = 8
    symmetric: bool = False
    narrow_range: bool = False
    granularity: str = "per_tensor"
    method: str = "auto"
    ema_decay: float = 0.9
    percentile: float = 99.99
    num_bins: int = 2048


BIAS_CORRECTIONS = ("none", "empirical", "analytic")
CLE_RELU6 = ("relu", "skip")
# The post-training algorithms, in the order they run (qtoolkit.algorithms.REGISTRY implements each): the one
# list that schemes, the pipeline's notes and the registry read.
ALGORITHM_NAMES = ("cle", "high_bias_absorption", "adaround", "bias_correction")


@dataclasses.dataclass(frozen=True)
class Algorithms:
    """Post-training algorithms (qtoolkit.algorithms), all off by default; see docs/algorithms.md.

    Attributes:
      cle: cross-layer equalization of consecutive conv layers.
      cle_relu6: "relu" (an equalized pair's ReLU6 becomes ReLU) or "skip" (pairs through ReLU6 are left alone).
      high_bias_absorption: move each ReLU channel's always-on bias share, max(0, beta - 3|gamma|) from its
        batch norm, into the next layer (after CLE when both are on); exact where the next layer has no padding.
      bias_correction: "none", "empirical" (calibration data) or "analytic" (batch-norm statistics).
      adaround: learned rounding of the weights, layer by layer on calibration data.
      adaround_iterations: optimisation steps per layer.
      adaround_reg: weight (lambda) of the rounding regulariser.
    """

    cle: bool = False
    cle_relu6: str = "relu"
    high_bias_absorption: bool = False
    bias_correction: str = "none"
    adaround: bool = False
    adaround_iterations: int = 1000
    adaround_reg: float = 0.01

    def enabled(self) -> tuple:
        """Names of the algorithms these options turn on, in the order they run (see ALGORITHM_NAMES)."""
        on = {"cle": self.cle, "high_bias_absorption": self.high_bias_absorption, "adaround": self.adaround,
              "bias_correction": self.bias_correction != "none"}
        return tuple(name for name in ALGORITHM_NAMES if on[name])


QAT_WEIGHT_RANGES = ("max", "mse", "learned")
QAT_ACTIVATION_RANGES = ("ema", "learned")


@dataclasses.dataclass(frozen=True)
class QATOptions:
    """How quantization-aware training sets its ranges (`qtoolkit.quantize_model`; docs/qat.md).

    Attributes:
      weight_range: per output channel, "max" (max |w|, TFMOT's "last value"), "mse" (the clipping of max |w|
        with the least squared weight error, recomputed every step) or "learned" (max |w| times a learned
        factor, trained with learned-step-size gradients).
      activation_range: "ema" (moving average of batch min/max) or "learned" (that average times learned
        factors for min and max, trained with learned-step-size gradients).
    """

    weight_range: str = "max"
    activation_range: str = "ema"


# What the int16_* keys of `layers` get: TFLite can run int8 and int16x8 ops in one file, but neither of the
# converter's paths writes that mix (measured, docs/design.md "Layers kept float or 16-bit").
INT16_UNAVAILABLE = (
    "16-bit activations for chosen layers are not available: the TFLite converter's fake-quant path drops the "
    "requantization between an int8 and an int16 tensor (it wrote a FULLY_CONNECTED with an int8 input and an "
    "int16 output, which LiteRT computes as zeros), and its int16x8 mode calibrates the whole model itself "
    "(it refuses fake-quant graphs); keep these layers float with layers.float_names / float_pattern / "
    "float_types, or quantize the whole model with the int16x8 scheme (see docs/design.md)")


@dataclasses.dataclass(frozen=True)
class LayerChoices:
    """Layers the user keeps out of int8, by name, name pattern or Keras class; all empty by default.

    A layer kept float is left as the model has it (not folded, fused or lowered to int8 ops): TFLite runs it
    in float between a DEQUANTIZE and a QUANTIZE. The report names it as kept float *because the scheme asks*
    (read from the written file), and `--strict` still fails on it, naming the key. Every name, the pattern
    and every type must match a layer of the model: one that matches none is a SchemeError naming it and the
    model's layers (a typo would otherwise quantize the layer the user meant to keep float).

        layers:
          float_names: [head]                 # exact layer names ("outer/inner" inside a nested model)
          float_pattern: "fc[0-9]+"           # a regular expression matched against whole layer names
          float_types: [LayerNormalization]   # Keras class names

    Attributes:
      float_names: layer names kept float.
      float_pattern: a regular expression (re.fullmatch) on layer names; "" for none.
      float_types: Keras layer class names (type(layer).__name__) kept float.
      int16_names, int16_pattern, int16_types: 16-bit activations for chosen layers; refused with the reason
        (INT16_UNAVAILABLE): TFLite's converter cannot write int8 and int16x8 ops into one file.
    """

    float_names: tuple = ()
    float_pattern: str = ""
    float_types: tuple = ()
    int16_names: tuple = ()
    int16_pattern: str = ""
    int16_types: tuple = ()

    @property
    def any(self) -> bool:
        """Whether any layer is asked to leave int8."""
        return any(getattr(self, f.name) for f in dataclasses.fields(self))

    def float_key(self, name: str, type_name: str) -> Optional[str]:
        """The key (and the value that matched) keeping layer `name` of class `type_name` float, or None."""
        if name in self.float_names:
            return f"layers.float_names {name}"
        if self.float_pattern and re.fullmatch(self.float_pattern, name):
            return f"layers.float_pattern {self.float_pattern!r}"
        if type_name in self.float_types:
            return f"layers.float_types {type_name}"
        return None

    def unmatched(self, names, type_names) -> list:
        """The keys whose value matches none of the layers `names` / classes `type_names`: ["key value"]."""
        names, type_names = list(names), set(type_names)
        missing = [f"layers.float_names {n}" for n in self.float_names if n not in names]
        if self.float_pattern and not any(re.fullmatch(self.float_pattern, n) for n in names):
            missing.append(f"layers.float_pattern {self.float_pattern!r}")
        return missing + [f"layers.float_types {t}" for t in self.float_types if t not in type_names]

    def to_dict(self) -> dict:
        return {f.name: list(v) if isinstance(v, tuple) else v
                for f in dataclasses.fields(self) for v in [getattr(self, f.name)]}


@dataclasses.dataclass(frozen=True)
class QuantScheme:
    """A whole scheme. `activations` is None for weight-only quantization.

    Attributes:
      name: short identifier (the preset name for presets).
      description: one line for humans.
      weights: WeightQuant.
      activations: ActivationQuant, or None (weights only, float activations).
      algorithms: Algorithms (post-training algorithms).
      layers: LayerChoices (layers the user keeps float).
      qat: QATOptions (ranges in quantization-aware training).
    """

    name: str = "custom"
    description: str = ""
    weights: WeightQuant = WeightQuant()
    activations: Optional[ActivationQuant] = ActivationQuant()
    algorithms: Algorithms = Algorithms()
    layers: LayerChoices = LayerChoices()
    qat: QATOptions = QATOptions()

    @property
    def weight_only(self) -> bool:
        """True when activations stay float (dynamic-range TFLite model)."""
        return self.activations is None

    def to_dict(self) -> dict[str, Any]:
        """A plain dict (YAML-ready) that `from_dict` turns back into the scheme."""
        data = dataclasses.asdict(self)
        data["layers"] = self.layers.to_dict()  # lists, not tuples: YAML's safe dumper has no tuples
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "<dict>") -> "QuantScheme":
        """Builds and validates a scheme.

        Args:
          data: mapping with keys name, description, weights, activations.
          source: where the data came from, for error messages.

        Raises:
          SchemeError: naming `source`, the key and the allowed values.
        """
        if not isinstance(data, Mapping):
            raise SchemeError(f"{source}: a scheme must be a mapping of keys, got {type(data).__name__}")
        top = _fields(cls, data, source, "")
        weights = top.get("weights", {})
        acts = top.get("activations", {}) if "activations" in top else {}
        scheme = cls(
            name=_typed(top.get("name", "custom"), str, source, "name"),
            description=_typed(top.get("description", ""), str, source, "description"),
            weights=WeightQuant(**_fields(WeightQuant, weights, source, "weights.")),
            activations=None if acts is None else ActivationQuant(**_fields(ActivationQuant, acts, source, "activations.")),
            algorithms=Algorithms(**_fields(Algorithms, top.get("algorithms", {}), source, "algorithms.")),
            layers=_layer_choices(top.get("layers", {}), source),
            qat=QATOptions(**_fields(QATOptions, top.get("qat", {}), source, "qat.")),
        )
        validate(scheme, source)
        return scheme

    def to_yaml(self) -> str:
        """The scheme as a YAML document."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def replace(self, **sections: Mapping[str, Any]) -> "QuantScheme":
        """A copy with fields of `weights` / `activations` overridden, validated.

        Example: `scheme.replace(activations={"method": "percentile"})`.
        """
        data = self.to_dict()
        for section, values in sections.items():
            if section not in ("weights", "activations", "algorithms", "layers", "qat"):
                data[section] = values
            elif data.get(section) is None:
                raise SchemeError(f"scheme {self.name!r} has no {section} to override")
            else:
                data[section] = {**data[section], **values}
        return QuantScheme.from_dict(data, source=f"scheme {self.name!r} with overrides")


def _fields(cls, data: Any, source: str, prefix: str) -> dict[str, Any]:
    """Checks that `data` is a mapping whose keys are fields of `cls`."""
    allowed = [f.name for f in dataclasses.fields(cls)]
    if not isinstance(data, Mapping):
        raise SchemeError(f"{source}: {prefix.rstrip('.') or 'scheme'} must be a mapping with keys "
                          f"{', '.join(allowed)}; got {data!r}")
    unknown = [k for k in data if k not in allowed]
    if unknown:
        raise SchemeError(f"{source}: unknown key {prefix}{unknown[0]!s}; allowed keys are "
                          f"{', '.join(prefix + a for a in allowed)}")
    return dict(data)


def _layer_choices(data: Any, source: str) -> LayerChoices:
    """The `layers` section, its lists as tuples (checked by `validate`)."""
    fields = _fields(LayerChoices, data if data is not None else {}, source, "layers.")
    return LayerChoices(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})


def _typed(value: Any, kind: type, source: str, key: str) -> Any:
    ok = isinstance(value, kind) and not (kind in (int, float) and isinstance(value, bool))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not ok:
        raise SchemeError(f"{source}: {key} must be {kind.__name__}, got {value!r}")
    return value


def _check_section(section: Any, source: str, prefix: str) -> None:
    for field in dataclasses.fields(section):
        value = getattr(section, field.name)
        kind = {"int": int, "bool": bool, "str": str, "float": float}[field.type]
        _typed(value, kind, source, prefix + field.name)
    if not MIN_BITS <= section.bits <= MAX_BITS:
        raise SchemeError(f"{source}: {prefix}bits must be an integer from {MIN_BITS} to {MAX_BITS}, "
                          f"got {section.bits}")
    if section.granularity not in GRANULARITIES:
        raise SchemeError(f"{source}: {prefix}granularity must be one of {', '.join(GRANULARITIES)}, "
                          f"got {section.granularity!r}")


def validate(scheme: QuantScheme, source: str = "<scheme>") -> None:
    """Raises SchemeError if a field has the wrong type or an unsupported value."""
    _check_section(scheme.weights, source, "weights.")
    _check_algorithms(scheme, source)
    _check_layers(scheme, source)
    for key, allowed in (("weight_range", QAT_WEIGHT_RANGES), ("activation_range", QAT_ACTIVATION_RANGES)):
        if getattr(scheme.qat, key) not in allowed:
            raise SchemeError(f"{source}: qat.{key} must be one of {', '.join(allowed)}, "
                              f"got {getattr(scheme.qat, key)!r}")
    acts = scheme.activations
    if acts is None:
        return
    _check_section(acts, source, "activations.")
    if acts.granularity != "per_tensor":
        raise SchemeError(f"{source}: activations.granularity must be per_tensor (TFLite has no "
                          f"per-channel activation quantization), got {acts.granularity!r}")
    if acts.method not in RANGE_METHODS:
        raise SchemeError(f"{source}: activations.method must be one of {', '.join(RANGE_METHODS)}, "
                          f"got {acts.method!r}")
    if not 0.0 < acts.ema_decay < 1.0:
        raise SchemeError(f"{source}: activations.ema_decay must be in (0, 1), got {acts.ema_decay}")
    if not 50.0 < acts.percentile <= 100.0:
        raise SchemeError(f"{source}: activations.percentile must be in (50, 100], got {acts.percentile}")
    if not 16 <= acts.num_bins <= 1 << 16:
        raise SchemeError(f"{source}: activations.num_bins must be from 16 to 65536, got {acts.num_bins}")
    if acts.bits == 16 and not acts.symmetric:
        raise SchemeError(f"{source}: activations.bits 16 needs activations.symmetric: true "
                          f"(TFLite's int16x8 mode has zero-point 0)")


def _check_algorithms(scheme: QuantScheme, source: str) -> None:
    algo = scheme.algorithms
    for field in dataclasses.fields(algo):
        kind = {"int": int, "bool": bool, "str": str, "float": float}[field.type]
        _typed(getattr(algo, field.name), kind, source, "algorithms." + field.name)
    if algo.cle_relu6 not in CLE_RELU6:
        raise SchemeError(f"{source}: algorithms.cle_relu6 must be one of {', '.join(CLE_RELU6)}, got {algo.cle_relu6!r}")
    if algo.bias_correction not in BIAS_CORRECTIONS:
        raise SchemeError(f"{source}: algorithms.bias_correction must be one of {', '.join(BIAS_CORRECTIONS)}, "
                          f"got {algo.bias_correction!r}")
    if not 1 <= algo.adaround_iterations <= 100000:
        raise SchemeError(f"{source}: algorithms.adaround_iterations must be from 1 to 100000, "
                          f"got {algo.adaround_iterations}")
    if not algo.adaround_reg >= 0.0:
        raise SchemeError(f"{source}: algorithms.adaround_reg must be >= 0, got {algo.adaround_reg}")
    if algo.enabled() and (scheme.activations is None or scheme.activations.bits == 16):
        raise SchemeError(f"{source}: algorithms ({', '.join(ALGORITHM_NAMES)}) need qtoolkit's fake-quant path; "
                          "they do not apply to weight-only or int16x8 schemes")
    if algo.adaround and not scheme.weights.symmetric:
        raise SchemeError(f"{source}: algorithms.adaround needs weights.symmetric: true")


def _check_layers(scheme: QuantScheme, source: str) -> None:
    choices = scheme.layers
    for kind in ("float", "int16"):
        for key in (f"{kind}_names", f"{kind}_types"):
            value = getattr(choices, key)
            if not isinstance(value, (tuple, list)) or not all(isinstance(v, str) and v for v in value):
                raise SchemeError(f"{source}: layers.{key} must be a list of {key[len(kind) + 1:]} (strings), "
                                  f"got {value!r}; e.g. {key}: [{'LayerNormalization' if 'types' in key else 'fc1'}]")
        pattern = getattr(choices, f"{kind}_pattern")
        if not isinstance(pattern, str):
            raise SchemeError(f"{source}: layers.{kind}_pattern must be a regular expression (a string), "
                              f"got {pattern!r}")
        try:
            re.compile(pattern)
        except re.error as e:
            raise SchemeError(f"{source}: layers.{kind}_pattern {pattern!r} is not a valid regular expression "
                              f"({e}); e.g. \"fc[0-9]+\" matches fc1, fc2, ...") from None
    asked16 = [f"int16_{k}" for k in ("names", "pattern", "types") if getattr(choices, f"int16_{k}")]
    if asked16:
        raise SchemeError(f"{source}: layers.{asked16[0]}: {INT16_UNAVAILABLE}")
    if choices.any and (scheme.activations is None or scheme.activations.bits == 16):
        raise SchemeError(f"{source}: layers.float_* keep layers out of qtoolkit's int8 rewrite; they do not apply "
                          "to weight-only or int16x8 schemes, which the TFLite converter quantizes itself")


def preset_names() -> list[str]:
    """Names of the presets (`configs/<name>.yaml`)."""
    folder = _config_dir()
    return sorted(f[:-5] for f in os.listdir(folder) if f.endswith(".yaml"))


def _config_dir() -> str:
    return CONFIG_DIR if os.path.isdir(CONFIG_DIR) else _PACKAGED_CONFIG_DIR


def load(name_or_path: str) -> QuantScheme:
    """Loads a preset by name (`int8`) or a scheme from a YAML file.

    Raises:
      SchemeError: unknown preset, unreadable file, invalid YAML or scheme.
    """
    if isinstance(name_or_path, QuantScheme):
        return name_or_path
    path = name_or_path
    if not (path.endswith((".yaml", ".yml")) or os.sep in path):
        path = os.path.join(_config_dir(), f"{name_or_path}.yaml")
        if not os.path.isfile(path):
            raise SchemeError(f"unknown scheme {name_or_path!r}; presets are {', '.join(preset_names())}, "
                              f"or give the path of a .yaml file")
    data = read_yaml(path, SchemeError, "scheme file")
    return QuantScheme.from_dict(data if data is not None else {}, source=path)


def read_yaml(path: str, error: type, what: str):
    """A YAML file's data (safe loader only); `error` (a QtoolkitError) names the file when it cannot be read.

    Args:
      path: the file.
      error: the exception class to raise.
      what: what the file is, for the message ("scheme file", "the regression config").
    """
    try:
        with open(path, encoding="utf-8") as f:
            return yaml.safe_load(f)
    except OSError as e:
        raise error(f"{path}: cannot read {what} ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise error(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
