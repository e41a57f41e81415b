"""The prepare stage: load -> split the data -> rewrite -> algorithms -> calibrate, once.

    from qtoolkit import prepare
    prepared = prepare.prepare("model.keras", "calib.npy", "int8")
    result = qtoolkit.ptq(prepared, output="model_int8.tflite")        # export + verify
    report = qtoolkit.debug.analyze(prepared)                          # per-layer errors, same state

Everything after this stage (`pipeline.ptq`'s export and verification, the
per-layer debugger, mixed precision, the regression job) reads the one
`Prepared` object: the model is loaded, rewritten and calibrated once, and
every tool measures the same held-out samples.  Tools never re-load or
re-calibrate from a path.

The samples are split here: the first `num_calibration` samples calibrate,
the next ones (or `verification_data`) verify.  Where the TFLite converter
calibrates itself (int16x8, a SavedModel without Keras metadata) or an
algorithm needs them, the calibration samples are kept in memory; otherwise
they are streamed through the calibration pass.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Callable, Optional

import numpy as np

from qtoolkit import algorithms
from qtoolkit import calibrate as cal
from qtoolkit import export, rewrite
from qtoolkit.rewrite import bias_grid
from qtoolkit.loading import LoadedModel, from_memory, load_model
from qtoolkit.schemes import QuantScheme, load as load_scheme

DEFAULT_CALIBRATION_SAMPLES = 500
DEFAULT_VERIFICATION_SAMPLES = 200


@dataclasses.dataclass
class Prepared:
    """The state every later stage reads (built by `prepare`).

    Attributes:
      loaded: the loaded model (`loaded.keras_model` is None for a SavedModel without Keras metadata).
      scheme: the scheme, with any range-method override applied.
      specs: (name, shape, dtype) per model input.
      num_calibration: calibration samples used.
      calibration_inputs: the calibration samples, one array per input, where they were kept in memory
        (int16x8, the converter's own calibration, algorithms that need data); else None.
      verification_inputs: the held-out verification samples, one array per input.
      rewritten: qtoolkit's rewrite of the Keras model (folded, fused, fake-quant placed), or None where the
        scheme or model has none (weight-only, a SavedModel; int16x8 unless `layerwise`).
      calibration: the calibrated ranges, or None where qtoolkit did not calibrate.
      algorithm_report: what the post-training algorithms did (see `qtoolkit.algorithms`).
      seconds: stage -> wall time (load, rewrite, algorithms, calibrate, and the stage's total).
      reference_outputs: the user's model's outputs on the verification samples where prepare already ran it
        (a Keras 3 model, to check its twin), else None.
      calibration_part: with `calibration_shard`, what this shard observed (to save and merge; no ranges are set
        and there are no verification samples).
    """

    loaded: LoadedModel
    scheme: QuantScheme
    specs: list
    num_calibration: int
    calibration_inputs: Optional[list]
    verification_inputs: list
    rewritten: Any = None
    calibration: Optional[cal.Calibration] = None
    algorithm_report: dict = dataclasses.field(default_factory=dict)
    seconds: dict = dataclasses.field(default_factory=dict)
    reference_outputs: Optional[list] = None
    calibration_part: Optional[cal.CalibrationPart] = None

    @property
    def keras_model(self):
        """The user's Keras model (never modified), or None."""
        return self.loaded.keras_model

    @property
    def output_names(self) -> list:
        """The model's output names in its own order (the flatbuffer's order too); [] if unknown."""
        model = self.keras_model
        return list(model.output_names) if model is not None else []

    @property
    def num_verification(self) -> int:
        return int(self.verification_inputs[0].shape[0])

    def representative(self) -> Callable:
        """The converter's representative_dataset over the calibration samples: one sample per call.

        The converter may iterate it more than once (it does for int16x8).
        """
        arrays = self.calibration_inputs

        def gen():
            for i in range(arrays[0].shape[0]):
                yield [a[i:i + 1] for a in arrays]
        return gen


def prepare(model: Any, calibration_data: Any, scheme: Any = "int8", *,
            num_calibration_samples: Optional[int] = None, num_verification_samples: Optional[int] = None,
            verification_data: Any = None, range_method: Optional[str] = None, batch_size: int = 32,
            strict: bool = False, progress: bool = True, image_size=None, image_scale=(0.0, 1.0),
            allow_unsafe: bool = False, layerwise: bool = False, log=None, image_mean=None, image_std=None,
            image_resize: str = "stretch", custom_objects=None, calibration_shard=None,
            calibration_parts=None) -> Prepared:
    """Loads, splits the data, rewrites, runs the scheme's algorithms and calibrates (see the module docstring).

    Args:
      model: a Keras model, a `loading.LoadedModel`, or the path of a SavedModel folder / .keras / .h5 file.
      calibration_data: see `calibrate.open_source` (arrays, .npy/.npz, image folder, dataset, generator).
      scheme: a preset name, a YAML path or a QuantScheme.
      num_calibration_samples: default up to 500, leaving the verification samples.
      num_verification_samples: default up to 200 (a fifth of the data at most), after the calibration samples.
      verification_data: separate verification inputs instead of held-out calibration data.
      range_method: overrides the scheme's activation range method.
      batch_size: calibration batch size.
      strict: unused here (kept for callers): `pipeline.ptq` fails on float ops of the written file.
      progress: show progress bars.
      image_size, image_scale, image_mean, image_std, image_resize: for image-folder data (see
        `calibrate.open_source`); the preprocessing is described to `log` in one line.
      allow_unsafe: allow loading models with serialized Python code.
      custom_objects: the user's classes a model file names: a dict, or a .py file defining them (its code runs).
      layerwise: also rewrite and calibrate where the export does not need it (int16x8), so the per-layer
        debugger can measure every layer.
      log: a function that takes progress messages, or None.
      calibration_shard: (i, n) or "i/n": observe only shard i of n of the calibration samples (a block of
        whole batches) into `Prepared.calibration_part`, to be merged with the others (calibrate/shards.py).
      calibration_parts: the parts (paths or `calibrate.CalibrationPart`s) of every shard: their merged
        ranges are set instead of a calibration pass, the same as one pass over those samples would set;
        the calibration samples of `calibration_data` are skipped, the verification samples follow them.

    Raises:
      loading.ModelLoadError, calibrate.DataError, schemes.SchemeError, rewrite.UnquantizableLayersError,
      export.ExportError, ValueError.
    """
    log = log or (lambda message: None)
    seconds = {}
    t0 = time.perf_counter()
    scheme = load_scheme(scheme) if not isinstance(scheme, QuantScheme) else scheme
    if range_method:
        if scheme.activations is None:
            raise ValueError(f"scheme {scheme.name!r} has no activation quantization; --range_method does not apply")
        scheme = scheme.replace(activations={"method": range_method})
    loaded = model if isinstance(model, LoadedModel) else (
        load_model(model, allow_unsafe, custom_objects) if isinstance(model, (str, os.PathLike))
        else from_memory(model))
    keras_model = loaded.keras_model
    if keras_model is not None:
        export.check_size_estimate(keras_model, 1.0)  # int8 weights: one byte per parameter
        specs = [(t.name.split(":")[0], tuple(t.shape), t.dtype.as_numpy_dtype) for t in keras_model.inputs]
    elif loaded.kind == "subclassed":  # not traceable: the converter calibrates it on the same samples
        from qtoolkit.loading import input_specs

        specs = [(f"input_{i}", tuple(s.shape), s.dtype.as_numpy_dtype)
                 for i, s in enumerate(input_specs(loaded.source_model))]
    else:
        specs = _saved_model_specs(loaded.path)
    seconds["load"] = time.perf_counter() - t0

    source = cal.open_source(calibration_data, specs, image_size, image_scale, image_mean=image_mean,
                             image_std=image_std, image_resize=image_resize, log=log)
    ver_source = None
    if verification_data is not None:
        ver_source = cal.open_source(verification_data, specs, image_size, image_scale, image_mean=image_mean,
                                     image_std=image_std, image_resize=image_resize, log=log)
        if num_verification_samples is None:
            num_verification_samples = ver_source.num_samples or DEFAULT_VERIFICATION_SAMPLES
    if calibration_parts:
        calibration_parts = [cal.load_part(p) for p in calibration_parts]  # each file read once
        if num_calibration_samples is None:
            num_calibration_samples = calibration_parts[0].total
    n_cal, n_ver = split(source, num_calibration_samples, num_verification_samples, ver_source is not None)

    quantizes_activations = keras_model is not None and scheme.activations is not None
    fake_quant = quantizes_activations and scheme.activations.bits != 16
    converter_calibrates = keras_model is None or (scheme.activations is not None and not fake_quant)
    do_rewrite = fake_quant or (quantizes_activations and layerwise)
    if scheme.layers.any and not do_rewrite:
        from qtoolkit.errors import SchemeError

        raise SchemeError(f"scheme {scheme.name!r}: layers.float_* keep layers out of qtoolkit's rewrite of a Keras "
                          "model; this model has none (it is converted by the TFLite converter itself): drop the keys")
    keep = converter_calibrates or (do_rewrite and algorithms.needs_data(scheme.algorithms))
    if calibration_shard is not None or calibration_parts:
        cal.shards.check(scheme, fake_quant, algorithms.needs_data(scheme.algorithms))
    cal_inputs = source.collect(n_cal) if keep else None
    rewritten = calibration = None
    algorithm_report = {}
    if do_rewrite:
        t1 = time.perf_counter()
        rewritten = rewrite.rewrite(keras_model, scheme)  # --strict reads the written file (pipeline)
        seconds["rewrite"] = time.perf_counter() - t1
        log(f"calibrating {len(rewritten.quant_points)} activation ranges ({scheme.activations.method}) "
            f"on {n_cal} samples")
        algo = scheme.algorithms if fake_quant else None
        if algo is not None:
            algorithm_report = algorithms.before_calibration(rewritten, algo, keras_model)
        cal_source = source if cal_inputs is None else cal.open_source(list(cal_inputs), specs)
        if calibration_shard is not None or calibration_parts:
            t2 = time.perf_counter()
            calibration, part = cal.shards.in_parts(rewritten, cal_source, n_cal, scheme, batch_size, progress,
                                                    calibration_shard, calibration_parts)
            if part is not None:  # a shard: what it observed is the result
                seconds["calibrate"] = time.perf_counter() - t2
                return Prepared(loaded, scheme, specs, n_cal, None, [], rewritten, None, algorithm_report,
                                seconds, None, part)
        else:
            calibration = cal.calibrate(rewritten, cal_source, n_cal, scheme, batch_size, progress)
        seconds["calibrate"] = calibration.seconds
        if algo is not None:
            algorithm_report = algorithms.after_calibration(rewritten, algo, cal_inputs, keras_model,
                                                            algorithm_report, log, progress=progress)
            if algorithm_report:
                seconds["algorithms"] = _algorithm_seconds(algorithm_report)
        if fake_quant:  # ranges and weights are final: the simulation adds the int32 bias the file adds
            bias_grid.snap_biases(rewritten.model)
    elif cal_inputs is None:
        for _ in source.take(n_cal):  # skip the calibration samples: verify on held-out ones
            pass
    ver = (ver_source or source).collect(n_ver)
    reference = _check_twin(loaded, ver) if loaded.source_model is not None and keras_model is not None else None
    seconds["total"] = time.perf_counter() - t0
    return Prepared(loaded, scheme, specs, n_cal, cal_inputs, ver, rewritten, calibration, algorithm_report,
                    seconds, reference)


TWIN_TOLERANCE = 1e-3  # relative to the output's range: float rounding of a different op order, nothing more


def _check_twin(loaded: LoadedModel, inputs: list) -> list:
    """The model qtoolkit reads (a Keras 3 model's tf_keras twin, a subclassed model's traced graph) computes
    the user's model's outputs on the verification samples.

    Returns the user's model's outputs (verification's float reference: not run again)."""
    from qtoolkit import verify

    ours = verify.predict_keras(loaded.keras_model, inputs, all_outputs=True)
    theirs = verify.predict_keras(loaded.source_model, inputs, all_outputs=True)
    for i, (a, b) in enumerate(zip(ours, theirs)):
        scale = max(float(np.max(np.abs(b))), 1e-6)
        error = float(np.max(np.abs(a - b))) / scale
        if not error <= TWIN_TOLERANCE:
            from qtoolkit.errors import UnsupportedModelError

            what = ("the tf_keras twin of the Keras 3 model" if loaded.keras_version == "3" and not loaded.note
                    else "the graph traced from the model's call")
            raise UnsupportedModelError(
                f"{what} differs from the model on output {i} by {error:.2g} of its range (a layer behaves "
                "differently when read this way); please report it with the model")
    return theirs


def split(source, n_cal, n_ver, separate_verification: bool) -> tuple[int, int]:
    """Numbers of calibration and verification samples (see `prepare`)."""
    for name, value in (("num_calibration_samples", n_cal), ("num_verification_samples", n_ver)):
        if value is not None and value < 1:
            raise cal.DataError(f"{name} must be at least 1, got {value}")
    n = source.num_samples
    if n is None:
        return n_cal or DEFAULT_CALIBRATION_SAMPLES // 2, n_ver or DEFAULT_VERIFICATION_SAMPLES // 2
    if separate_verification:
        n_ver = n_ver or DEFAULT_VERIFICATION_SAMPLES
        n_cal = n_cal or min(DEFAULT_CALIBRATION_SAMPLES, n)
        if n_cal > n:
            raise cal.DataError(f"{source.description}: {n} samples, fewer than the {n_cal} calibration samples "
                                "asked for; give more data or lower --num_calibration_samples")
        return n_cal, n_ver
    if n < 2:
        raise cal.DataError(f"{source.description}: {n} sample; give at least 2 (calibration + verification)")
    n_ver = n_ver or max(1, min(DEFAULT_VERIFICATION_SAMPLES, n // 5))
    n_cal = n_cal or min(DEFAULT_CALIBRATION_SAMPLES, n - n_ver)
    if n_cal + n_ver > n:
        raise cal.DataError(f"{source.description}: {n} samples, fewer than the {n_cal} calibration + {n_ver} "
                            "verification samples asked for; give more data or lower "
                            "--num_calibration_samples / --num_verification_samples")
    return n_cal, n_ver


def _algorithm_seconds(report: dict) -> float:
    """Wall time of the post-training algorithms in a report of qtoolkit.algorithms."""
    total = 0.0
    for entry in report.values():
        seconds = entry.get("seconds", 0.0)
        total += seconds["total"] if isinstance(seconds, dict) else seconds
    return total


def _saved_model_specs(path):
    import tensorflow as tf

    loaded = tf.saved_model.load(path)
    fn = loaded.signatures.get("serving_default")
    if fn is None:
        raise ValueError(f"{path}: the SavedModel has no serving_default signature")
    specs = fn.structured_input_signature[1]
    return [(name, tuple(spec.shape), spec.dtype.as_numpy_dtype) for name, spec in sorted(specs.items())]
