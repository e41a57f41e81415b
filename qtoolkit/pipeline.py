"""The post-training quantization front door: model -> rewrite -> calibrate -> export -> verify.

    import qtoolkit
    result = qtoolkit.ptq("model.keras", "calib.npy", scheme="int8", output="model_int8.tflite")
    print(result.table())

Returns a frozen `PTQResult` with the flatbuffer, its inspection, the ranges
chosen, and the verification measured on held-out samples (by default the
samples that follow the calibration samples in the data).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Optional

import numpy as np

from qtoolkit import algorithms
from qtoolkit import calibrate as cal
from qtoolkit import export, rewrite, verify
from qtoolkit.loading import LoadedModel, load_model
from qtoolkit.schemes import QuantScheme, load as load_scheme

DEFAULT_CALIBRATION_SAMPLES = 500
DEFAULT_VERIFICATION_SAMPLES = 200


@dataclasses.dataclass(frozen=True)
class PTQResult:
    """What `ptq` produced and measured.

    Attributes:
      tflite: the flatbuffer bytes.
      output: where it was written, or None.
      scheme: the scheme used.
      path: which conversion path was taken, in words.
      notes: what the path could not do, or other caveats.
      inspection: export.Inspection of the flatbuffer.
      calibration: cal.Calibration, or None when the converter calibrated.
      comparisons: name -> verify.Comparison.
      folded: fused patterns; float_layers: layers left in float.
      seconds: stage -> wall time.
    """

    tflite: bytes
    output: Optional[str]
    scheme: QuantScheme
    path: str
    notes: tuple
    inspection: export.Inspection
    calibration: Optional[cal.Calibration]
    comparisons: dict
    folded: tuple
    float_layers: tuple
    seconds: dict

    def table(self) -> str:
        return verify.format_table(self.comparisons)

    def to_dict(self) -> dict:
        return {
            "output": self.output, "scheme": self.scheme.to_dict(), "path": self.path, "notes": list(self.notes),
            "inspection": self.inspection.to_dict(),
            "calibration": None if self.calibration is None else {
                "samples": self.calibration.samples, "method": self.calibration.method,
                "seconds": self.calibration.seconds,
                "ranges": {k: list(v) for k, v in self.calibration.ranges.items()}},
            "comparisons": {k: v.to_dict() for k, v in self.comparisons.items()},
            "folded": list(self.folded), "float_layers": list(self.float_layers), "seconds": self.seconds,
        }


def _first(outputs):
    return outputs[0] if isinstance(outputs, list) else outputs


def ptq(model: Any, calibration_data: Any, scheme: Any = "int8", output: Optional[str] = None, *,
        num_calibration_samples: Optional[int] = None, num_verification_samples: Optional[int] = None,
        verification_data: Any = None, labels: Optional[np.ndarray] = None, range_method: Optional[str] = None,
        io_dtype: str = "int8", batch_size: int = 32, strict: bool = False, progress: bool = True,
        image_size=None, image_scale=(0.0, 1.0), allow_unsafe: bool = False, log=None) -> PTQResult:
    """Post-training quantization of a model, verified with the LiteRT interpreter.

    Args:
      model: a tf_keras model, or the path of a SavedModel folder / .keras / .h5 file.
      calibration_data: see `calibrate.open_source` (arrays, .npy/.npz, image folder, dataset, generator).
      scheme: a preset name, a YAML path or a QuantScheme.
      output: where to write the .tflite (atomically), or None.
      num_calibration_samples: samples for calibration (default: up to 500,
        leaving the verification samples).
      num_verification_samples: held-out samples for verification (default:
        up to 200, taken after the calibration samples).
      verification_data: separate verification inputs (instead of held-out calibration data).
      labels: labels of the verification samples, for accuracy.
      range_method: overrides the scheme's activation range method.
      io_dtype: "int8", "uint8" or "float32" model inputs and outputs.
      batch_size: calibration batch size.
      strict: fail if some layer would stay float.
      progress: show progress bars.
      image_size, image_scale: for image-folder data.
      allow_unsafe: allow loading models with serialized Python code.
      log: a function that takes progress messages (e.g. print), or None.

    Raises:
      loading.ModelLoadError, calibrate.DataError, schemes.SchemeError,
      rewrite.UnquantizableLayersError, export.ExportError, ValueError.
    """
    seconds = {}
    log = log or (lambda message: None)
    t0 = time.perf_counter()
    if output:
        export.check_writable(output)
    scheme = load_scheme(scheme) if not isinstance(scheme, QuantScheme) else scheme
    if range_method:
        if scheme.activations is None:
            raise ValueError(f"scheme {scheme.name!r} has no activation quantization; --range_method does not apply")
        scheme = scheme.replace(activations={"method": range_method})
    if io_dtype not in export.IO_DTYPES:
        raise ValueError(f"io_dtype must be one of {', '.join(export.IO_DTYPES)}, got {io_dtype!r}")
    loaded = model if isinstance(model, LoadedModel) else (
        load_model(model, allow_unsafe) if isinstance(model, str) else LoadedModel("<in memory>", model, "keras"))
    keras_model = loaded.keras_model
    if keras_model is not None:
        export.check_size_estimate(keras_model, 1.0)  # int8 weights: one byte per parameter
        specs = [(t.name.split(":")[0], tuple(t.shape), t.dtype.as_numpy_dtype) for t in keras_model.inputs]
    else:
        specs = _saved_model_specs(loaded.path)
    seconds["load"] = time.perf_counter() - t0

    source = cal.open_source(calibration_data, specs, image_size, image_scale)
    ver_source = None
    if verification_data is not None:
        ver_source = cal.open_source(verification_data, specs, image_size, image_scale)
        if num_verification_samples is None:
            num_verification_samples = ver_source.num_samples or DEFAULT_VERIFICATION_SAMPLES
    n_cal, n_ver = _split(source, num_calibration_samples, num_verification_samples, ver_source is not None)
    notes = []
    calibration = None
    rewritten = None
    t1 = time.perf_counter()
    if keras_model is None:
        path = "TFLite converter calibration (not a Keras model)"
        notes.append("the model is a SavedModel without Keras metadata: converted with the TFLite converter's own "
                     "calibration; qtoolkit's rewriter, range methods and simulation gap are not available")
        import tensorflow as tf

        converter = tf.lite.TFLiteConverter.from_saved_model(loaded.path)
        data = export.converter_ptq_tflite(converter, _representative(source, n_cal), io_dtype=io_dtype,
                                           int16x8=scheme.activations is not None and scheme.activations.bits == 16)
    elif scheme.weight_only:
        path = "dynamic range (int8 weights, float activations)"
        data = export.weight_only_tflite(keras_model)
        if ver_source is None:
            for _ in source.take(n_cal):  # skip the calibration samples: verify on held-out ones
                pass
    elif scheme.activations.bits == 16:
        path = "TFLite converter int16x8 calibration"
        notes.append("int16x8: the converter has no fake-quant path for 16-bit activations, so it calibrates "
                     "activation ranges itself (min/max) on the same samples; int16 kernels are reference "
                     "kernels (slow on CPU)")
        data = export.converter_ptq_tflite(keras_model, _representative(source, n_cal), int16x8=True,
                                           io_dtype=io_dtype)
    else:
        path = "qtoolkit rewrite + calibration, TFLite converter (fake-quant path)"
        rewritten = rewrite.rewrite(keras_model, scheme, strict=strict)
        seconds["rewrite"] = time.perf_counter() - t1
        log(f"calibrating {len(rewritten.quant_points)} activation ranges ({scheme.activations.method}) "
            f"on {n_cal} samples")
        algo = scheme.algorithms
        algo_report = algorithms.before_calibration(rewritten, algo, keras_model)
        cal_source, cal_inputs = source, None
        if algorithms.needs_data(algo):
            cal_inputs = source.collect(n_cal)  # held for AdaRound / bias correction
            cal_source = cal.open_source(cal_inputs, specs)
        calibration = cal.calibrate(rewritten, cal_source, n_cal, scheme, batch_size, progress)
        algo_report = algorithms.after_calibration(rewritten, algo, cal_inputs, keras_model, algo_report, log)
        if algo_report:
            notes.append("algorithms: " + "; ".join(f"{k} {v}" for k, v in algo_report.items()))
            seconds["algorithms"] = _algorithm_seconds(algo_report)
        log("converting with the TFLite converter")
        seconds["calibrate"] = calibration.seconds
        t2 = time.perf_counter()
        data = export.fake_quant_to_tflite(rewritten.model, io_dtype)
        seconds["convert"] = time.perf_counter() - t2
        if scheme.weights.bits < 8:
            notes.append(f"{scheme.weights.bits}-bit weights are stored in int8 tensors on the "
                         f"{scheme.weights.bits}-bit grid (conv: exact; fully connected: the converter "
                         "re-quantizes them to 8 bits)")
        if scheme.activations.bits < 8:
            notes.append(f"TFLite has no {scheme.activations.bits}-bit activation kernels: the model is exported "
                         "with int8 activations over the calibrated ranges; the simulated column is the "
                         f"{scheme.activations.bits}-bit model, so the simulation gap does not apply")
    if "convert" not in seconds:
        seconds["convert"] = time.perf_counter() - t1
    if rewritten is None and algorithms.needs_rewrite(scheme.algorithms):
        notes.append("the scheme's algorithms (cle, bias_correction, adaround) were not applied: they need "
                     "qtoolkit's rewrite of a Keras model")
    inspection = export.inspect(data)

    t3 = time.perf_counter()
    if ver_source is not None:
        ver = ver_source.collect(n_ver)
    else:
        ver = source.collect(n_ver)
    tfl = verify.LiteRTModel(data)
    tfl_out = _first(tfl.predict(ver))
    if keras_model is not None:
        float_out = verify.predict_keras(keras_model, ver)
    else:
        float_out = _first(verify.LiteRTModel(export.float_tflite_saved_model(loaded.path)).predict(ver))
    y = None if labels is None else np.asarray(labels)[:n_ver]
    step = tfl.output_step()
    comparisons = {"float vs TFLite": verify.compare(float_out, tfl_out, y, step)}
    if rewritten is not None:
        sim_out = verify.predict_keras(rewritten.model, ver)
        comparisons["float vs simulated"] = verify.compare(float_out, sim_out, y, step)
        comparisons["simulated vs TFLite"] = verify.compare(sim_out, tfl_out, y, step)
    seconds["verify"] = time.perf_counter() - t3
    if output:
        export.write_atomic(output, data)
    seconds["total"] = time.perf_counter() - t0
    return PTQResult(data, output, scheme, path, tuple(notes), inspection, calibration, comparisons,
                     tuple(rewritten.folded) if rewritten else (), tuple(rewritten.float_layers) if rewritten else (),
                     seconds)


def _split(source, n_cal, n_ver, separate_verification: bool) -> tuple[int, int]:
    """Numbers of calibration and verification samples (see `ptq`)."""
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


def _representative(source, n):
    """The converter's representative_dataset: one sample per call.

    The converter may iterate it more than once (it does for int16x8); the
    source is a stream, so the n samples are read once and replayed.
    """
    batches = []

    def gen():
        if not batches:
            batches.extend(source.take(n, 32))
        for batch in batches:
            for i in range(batch[0].shape[0]):
                yield [a[i:i + 1] for a in batch]
    return gen


def _saved_model_specs(path):
    import tensorflow as tf

    loaded = tf.saved_model.load(path)
    fn = loaded.signatures.get("serving_default")
    if fn is None:
        raise ValueError(f"{path}: the SavedModel has no serving_default signature")
    specs = fn.structured_input_signature[1]
    return [(name, tuple(spec.shape), spec.dtype.as_numpy_dtype) for name, spec in sorted(specs.items())]
