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
from qtoolkit import contained, export, inspection, verify
from qtoolkit.errors import ExportError, QtoolkitError, UnquantizableLayersError
from qtoolkit.prepare import Prepared, prepare
from qtoolkit.schemes import QuantScheme


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
      comparisons: name ("float vs TFLite", "float vs simulated", "simulated vs TFLite") -> verify.Comparison
        of the model's first output (its only one for most models).
      folded: fused patterns; float_layers: what the written flatbuffer computes in float (the layers its
        float ops come from, read from the file, not predicted).
      seconds: stage -> wall time.
      outputs: "float", "tflite" (and "simulated") -> the first model output on the verification samples,
        as measured for `comparisons` (so later tools need not run the models again).
      per_output: output name -> the comparisons of that output, for every output, each against its own
        float twin (in the model's output order, which is also the file's).
      requested_float: layer name -> the scheme key that keeps it float (`schemes.LayerChoices`), for every
        layer the scheme asked for; which of them the file computes in float is `float_layers`' to say
        (see `float_report`).
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
    outputs: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)
    per_output: dict = dataclasses.field(default_factory=dict)
    requested_float: dict = dataclasses.field(default_factory=dict)

    def float_report(self) -> list:
        """What the written file computes in float, as lines: the layers kept float because the scheme asks
        (with its key), the layers left float for other reasons, and asked ones the file runs in integer."""
        asked = [n for n in self.float_layers if n in self.requested_float]
        other = [n for n in self.float_layers if n not in self.requested_float]
        integer = [n for n in self.requested_float if n not in self.float_layers]
        lines = []
        if asked:
            lines.append("kept float as the scheme asks: " + ", ".join(f"{n} ({self.requested_float[n]})"
                                                                      for n in asked))
        if other:
            lines.append(f"left in float{' (not asked by the scheme)' if self.requested_float else ''}: "
                         + ", ".join(other))
        if integer:
            lines.append("asked float by the scheme but computed in integer in the file (the converter quantized "
                         "them: an int8 kernel that keeps its input's scale): " + ", ".join(integer))
        return lines

    def table(self) -> str:
        """The verification table; one per output (named, with its task) when the model has several."""
        if len(self.per_output) <= 1:
            return verify.format_table(self.comparisons)
        return "\n\n".join(f"output {name!r} ({next(iter(c.values())).task}):\n{verify.format_table(c)}"
                            for name, c in self.per_output.items())

    def to_dict(self) -> dict:
        return {
            "output": self.output, "scheme": self.scheme.to_dict(), "path": self.path, "notes": list(self.notes),
            "inspection": self.inspection.to_dict(),
            "calibration": None if self.calibration is None else {
                "samples": self.calibration.samples, "method": self.calibration.method,
                "seconds": self.calibration.seconds,
                "ranges": {k: list(v) for k, v in self.calibration.ranges.items()}},
            "comparisons": {k: v.to_dict() for k, v in self.comparisons.items()},
            "per_output": {o: {k: v.to_dict() for k, v in c.items()} for o, c in self.per_output.items()},
            "folded": list(self.folded), "float_layers": list(self.float_layers), "seconds": self.seconds,
            "requested_float": dict(self.requested_float),
        }


def ptq(model: Any, calibration_data: Any = None, scheme: Any = "int8", output: Optional[str] = None, *,
        num_calibration_samples: Optional[int] = None, num_verification_samples: Optional[int] = None,
        verification_data: Any = None, labels: Any = None, output_tasks: Any = None, metrics: Any = None,
        range_method: Optional[str] = None,
        io_dtype: str = "int8", batch_size: int = 32, strict: bool = False, progress: bool = True,
        image_size=None, image_scale=(0.0, 1.0), allow_unsafe: bool = False, log=None, image_mean=None,
        image_std=None, image_resize: str = "stretch", custom_objects=None, calibration_parts=None) -> PTQResult:
    """Post-training quantization of a model, verified with the LiteRT interpreter.

    Args:
      model: a Keras model, the path of a SavedModel folder / .keras / .h5 file, or a `prepare.Prepared`
        (then the data, scheme and sample arguments are those it was prepared with, and are not given here).
      calibration_data: see `calibrate.open_source` (arrays, .npy/.npz, image folder, dataset, generator).
      scheme: a preset name, a YAML path or a QuantScheme.
      output: where to write the .tflite (atomically), or None.
      num_calibration_samples: samples for calibration (default: up to 500,
        leaving the verification samples).
      num_verification_samples: held-out samples for verification (default:
        up to 200, taken after the calibration samples).
      verification_data: separate verification inputs (instead of held-out calibration data).
      labels: labels of the verification samples, for accuracy: an array (the first output's), or one per
        output (a list, or a dict keyed by output name); per position for per-pixel/per-anchor outputs.
      output_tasks: "classification", "regression" or "auto" (default), for all outputs or per output
        (list / dict by output name): see `verify.compare`.
      metrics: a function (outputs, labels) -> float measured on float and TFLite outputs, or one per
        output (list / dict by output name).
      range_method: overrides the scheme's activation range method.
      io_dtype: "int8", "uint8" or "float32" model inputs and outputs.
      batch_size: calibration batch size.
      strict: fail if the written file computes anything in float (read from the file; nothing is written).
      progress: show progress bars.
      image_size, image_scale, image_mean, image_std, image_resize: for image-folder data (see
        `calibrate.open_source`); the preprocessing is described to `log` in one line.
      allow_unsafe: allow loading models with serialized Python code.
      custom_objects: the user's classes a model file names: a dict, or a .py file defining them (its code runs).
      log: a function that takes progress messages (e.g. print), or None.
      calibration_parts: the calibration parts of every shard (paths or `calibrate.CalibrationPart`s): their
        merged ranges instead of a calibration pass (see `prepare`; calibrate/shards.py).

    Raises:
      loading.ModelLoadError, calibrate.DataError, schemes.SchemeError,
      rewrite.UnquantizableLayersError, export.ExportError, ValueError.
    """
    log = log or (lambda message: None)
    t0 = time.perf_counter()
    if output:
        export.check_writable(output)
    if io_dtype not in export.IO_DTYPES:
        raise ValueError(f"io_dtype must be one of {', '.join(export.IO_DTYPES)}, got {io_dtype!r}")
    already = isinstance(model, Prepared)  # prepared before this call: its time is added to the total
    if already:
        prepared = model
    else:
        prepared = prepare(model, calibration_data, scheme, num_calibration_samples=num_calibration_samples,
                           num_verification_samples=num_verification_samples, verification_data=verification_data,
                           range_method=range_method, batch_size=batch_size, strict=strict, progress=progress,
                           image_size=image_size, image_scale=image_scale, allow_unsafe=allow_unsafe, log=log,
                           image_mean=image_mean, image_std=image_std, image_resize=image_resize,
                           custom_objects=custom_objects, calibration_parts=calibration_parts)
    seconds = {k: v for k, v in prepared.seconds.items() if k != "total"}
    data, path, notes, rewritten = _export(prepared, io_dtype, log, seconds)
    inspection = export.inspect(data)
    float_layers = _float_layers(prepared, rewritten, inspection)
    requested = dict(rewritten.requested_float) if rewritten is not None else {}
    if strict and float_layers:
        asked = [n for n in float_layers if n in requested]
        raise UnquantizableLayersError(
            f"--strict: the {prepared.scheme.name} file computes in float in {len(float_layers)} place(s): "
            + ", ".join(n + (f" (kept float by the scheme: {requested[n]})" if n in requested else "")
                        for n in float_layers)
            + "; nothing was written (" + ("drop the scheme's layers.float_* keys or --strict" if asked else
                                           "keep them float by dropping --strict")
            + ", or see docs/coverage.md for what converts fully integer)")
    t3 = time.perf_counter()
    comparisons, outputs, per_output = _verify(prepared, data, rewritten, labels, output_tasks, metrics)
    seconds["verify"] = time.perf_counter() - t3
    if output:
        export.write_atomic(output, data)
    seconds["total"] = time.perf_counter() - t0 + (prepared.seconds["total"] if already else 0.0)
    result = PTQResult(data, output, prepared.scheme, path, tuple(notes), inspection,
                       prepared.calibration if rewritten is not None else None, comparisons,
                       tuple(rewritten.folded) if rewritten else (), float_layers, seconds, outputs, per_output,
                       requested)
    # The scheme's float layers in the notes too, so that every report that prints notes shows them.
    asked = [line for line in result.float_report() if not line.startswith("left in float")]
    return dataclasses.replace(result, notes=result.notes + tuple(asked)) if asked else result


def _float_layers(prepared: Prepared, rewritten, facts) -> tuple:
    """What the written file computes in float, named by layer where the tensor names tell (see inspection)."""
    names = []
    for model in (prepared.keras_model, None if rewritten is None else rewritten.model):
        if model is not None:
            names += [layer.name for layer in model.layers]
    return inspection.float_layers(facts, names)


def _export(prepared: Prepared, io_dtype: str, log, seconds: dict):
    """The flatbuffer for the prepared state: (bytes, path in words, notes, the rewrite it came from or None)."""
    scheme, keras_model = prepared.scheme, prepared.keras_model
    notes = [prepared.loaded.note] if prepared.loaded.note and keras_model is not None else []
    rewritten = None
    t1 = time.perf_counter()
    if keras_model is None:
        import tensorflow as tf

        if prepared.loaded.kind == "subclassed":
            path = "TFLite converter calibration on qtoolkit's samples (subclassed model, not traceable)"
            notes.append(f"{prepared.loaded.note}: converted with the TFLite converter's own calibration on "
                         "qtoolkit's calibration samples; qtoolkit's rewriter, range methods and simulation gap "
                         "are not available")
            from qtoolkit.loading import input_specs

            # Traced by tf.function (AutoGraph turns Python control flow on tensors into graph ops).
            converter = export.converter_from_function(prepared.loaded.source_model,
                                                        input_specs(prepared.loaded.source_model))
        else:
            path = "TFLite converter calibration (not a Keras model)"
            notes.append("the model is a SavedModel without Keras metadata: converted with the TFLite converter's "
                         "own calibration; qtoolkit's rewriter, range methods and simulation gap are not available")
            converter = tf.lite.TFLiteConverter.from_saved_model(prepared.loaded.path)
        data = export.converter_ptq_tflite(converter, prepared.representative(), io_dtype=io_dtype,
                                           int16x8=scheme.activations is not None and scheme.activations.bits == 16)
    elif scheme.weight_only:
        path = "dynamic range (int8 weights, float activations)"
        data = export.weight_only_tflite(keras_model)
    elif scheme.activations.bits == 16:
        path = "TFLite converter int16x8 calibration"
        notes.append("int16x8: the converter has no fake-quant path for 16-bit activations, so it calibrates "
                     "activation ranges itself (min/max) on the same samples; int16 kernels are reference "
                     "kernels (slow on CPU)")
        data = export.converter_ptq_tflite(keras_model, prepared.representative(), int16x8=True,
                                           io_dtype=io_dtype)
    else:
        path = "qtoolkit rewrite + calibration, TFLite converter (fake-quant path)"
        rewritten = prepared.rewritten
        if prepared.algorithm_report:
            notes.append("algorithms: " + "; ".join(f"{k} {v}" for k, v in prepared.algorithm_report.items()))
        log("converting with the TFLite converter")
        t1 = time.perf_counter()
        data = export.fake_quant_to_tflite(rewritten.model, io_dtype)
        if scheme.weights.bits < 8:
            notes.append(f"{scheme.weights.bits}-bit weights are stored in int8 tensors on the "
                         f"{scheme.weights.bits}-bit grid (conv: exact; fully connected: the converter "
                         "re-quantizes them to 8 bits)")
        if scheme.activations.bits < 8:
            levels = 1 << scheme.activations.bits
            clamps = export.inspect(data).ops.get("MINIMUM", 0)
            notes.append(f"TFLite has no {scheme.activations.bits}-bit activation kernels: each activation is an int8 "
                         f"tensor holding only its {levels} trained levels (the {scheme.activations.bits}-bit scale "
                         "and zero point; the kernels' ReLU and int8 saturation clamp to them"
                         + (f", and {clamps} MINIMUM op(s) where they cannot, outside XNNPACK" if clamps else "")
                         + "), so the file computes the simulated model; softmax/logistic/tanh outputs keep "
                         "TFLite's fixed 8-bit parameters")
    seconds["convert"] = time.perf_counter() - t1
    if rewritten is None and algorithms.needs_rewrite(scheme.algorithms):
        notes.append(f"the scheme's algorithms ({', '.join(scheme.algorithms.enabled())}) were not applied: they "
                     "need qtoolkit's rewrite of a Keras model")
    return data, path, notes, rewritten


def _verify(prepared: Prepared, data: bytes, rewritten, labels, tasks, metrics) -> tuple[dict, dict, dict]:
    """Float vs TFLite (and vs qtoolkit's simulation) on the prepared verification samples, every output.

    Returns (name -> verify.Comparison of the first output, model -> first output, output -> comparisons).
    """
    ver = prepared.verification_inputs
    tfl_out = _all(_run_contained(prepared, data, rewritten))
    tfl = verify.LiteRTModel(data)  # after the contained run, which showed that LiteRT runs the file
    if prepared.reference_outputs is not None:  # a Keras 3 model's own outputs, run once by prepare
        float_out = list(prepared.reference_outputs)
    elif prepared.loaded.reference_model is not None:
        float_out = verify.predict_keras(prepared.loaded.reference_model, ver, all_outputs=True)
    else:
        float_out = _all(verify.LiteRTModel(export.float_tflite_saved_model(prepared.loaded.path)).predict(ver))
    names = prepared.output_names or [f"output_{i}" for i in range(len(tfl_out))]
    n = prepared.num_verification
    steps = [tfl.output_step(i) for i in range(len(tfl_out))]

    outputs = {"float": float_out[0], "tflite": tfl_out[0]}
    pairs = {"float vs TFLite": (float_out, tfl_out)}
    if rewritten is not None:
        sim_out = verify.predict_keras(rewritten.model, ver, all_outputs=True)[:len(names)]
        outputs["simulated"] = sim_out[0]
        pairs.update({"float vs simulated": (float_out, sim_out), "simulated vs TFLite": (sim_out, tfl_out)})
    try:
        y = {name: None if v is None else np.asarray(v)[:n]
             for name, v in zip(names, verify.per_output(labels, names, "labels"))}
        by_pair = {pair: verify.compare_outputs(a, b, names, y, steps, tasks, metrics)
                   for pair, (a, b) in pairs.items()}
    except ValueError as e:  # labels, tasks or metrics that do not fit the outputs
        raise cal.DataError(f"verification: {e} (see --labels / --output_tasks)") from None
    per_output = {name: {pair: c[name] for pair, c in by_pair.items()} for name in names}
    return per_output[names[0]], outputs, per_output


def _run_contained(prepared: Prepared, data: bytes, rewritten):
    """The file's outputs on the verification samples, run in a child process (`qtoolkit.contained`): a LiteRT
    abort is one error line saying whether the converter's own file for the scheme aborts too."""
    ver = prepared.verification_inputs

    def converters_own() -> bytes:  # only built after a crash of qtoolkit's own file
        cal = prepared.calibration_inputs if prepared.calibration_inputs is not None else ver
        return export.converter_ptq_tflite(prepared.keras_model, dataclasses.replace(
            prepared, calibration_inputs=cal).representative())

    try:
        return contained.predict_explained(data, ver, prepared.scheme.name,
                                           converters_own if rewritten is not None else None)
    except RuntimeError as e:  # LiteRT refused the file without crashing (a kernel that lacks a type)
        if isinstance(e, QtoolkitError):
            raise
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise ExportError(f"LiteRT cannot run the {prepared.scheme.name} file: {first}; try another scheme "
                          "(e.g. int8)") from None


def _all(outputs) -> list:
    return outputs if isinstance(outputs, list) else [outputs]
