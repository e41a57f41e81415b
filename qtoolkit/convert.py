"""`python -m qtoolkit.convert`: a trained model -> a verified int8 TFLite model.

    python -m qtoolkit.convert --model model.keras --output model_int8.tflite \\
        --calibration_data calib.npy [--scheme int8] [--report report.json]

Loads the model, rewrites it (batch norm folded, activations fused,
fake-quant placed where TFLite quantizes), calibrates activation ranges on
the representative data, converts with the TFLite converter, inspects the
flatbuffer and verifies it against the float model with the LiteRT
interpreter on held-out samples.  Exit code 0 on success, 1 when the input
is bad or conversion fails (one line says what and how to fix it), 2 on
wrong usage.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys

from qtoolkit import _env  # noqa: F401  (before TensorFlow)

from absl import app, flags

from qtoolkit import _cli  # the flags every tool shares (--model, --scheme, --output, ...), errors, signals
from qtoolkit import _cli_calibration as _calflags
from qtoolkit import schemes  # plain data and YAML: no TensorFlow
from qtoolkit.errors import UsageError  # noqa: F401  (raised here; defined with the others)

flags.adopt_module_key_flags(_cli)  # shown in this tool's --help
flags.adopt_module_key_flags(_calflags)  # --batch_size, --range_method, --merge_calibration
_MODEL, _OUTPUT, _CALIBRATION, _SCHEME = _cli.MODEL, _cli.OUTPUT, _cli.CALIBRATION, _cli.SCHEME
_NUM_CAL, _UNSAFE, _VERBOSE = _cli.NUM_CALIBRATION, _cli.UNSAFE, _cli.VERBOSE
_RANGE, _BATCH, _MERGE = _calflags.RANGE_METHOD, _calflags.BATCH_SIZE, _calflags.MERGE_CALIBRATION
_REPORT = flags.DEFINE_string("report", None, "Write the inspection and verification report as JSON here.")
_NUM_VER = flags.DEFINE_integer("num_verification_samples", None,
                                "Held-out samples for verification (default: up to 200, after the calibration ones).")
_VER_DATA = flags.DEFINE_string("verification_data", None,
                                "Separate verification inputs (.npy/.npz) instead of held-out calibration data.")
_LABELS = flags.DEFINE_string("labels", None, "Integer labels of the verification samples, for accuracy: .npy (the "
                              "first output's), or .npz with one array per output name; per pixel / per anchor "
                              "for segmentation and detection outputs.")
_METRICS = flags.DEFINE_string(
    "output_metrics", None, "A metric per output, measured on the float and int8 outputs against --labels: "
    "name=metric pairs (or one metric for a single-output model), metric one of mean_iou (segmentation), "
    "mean_abs_error (regression targets), top5_accuracy; e.g. mask=mean_iou. Python: metrics= also takes "
    "functions.")
_TASKS = flags.DEFINE_string(
    "output_tasks", None, "What each output is, for its metrics: classification (top-1 agreement over the last axis "
    "at every position: per sample, pixel or anchor), regression (SQNR and errors only) or auto (classification "
    "when the last axis has > 1 value; the default). One task for all outputs, or per output: boxes=regression,"
    "classes=classification.")
_IO = flags.DEFINE_enum("io_dtype", "int8", ["int8", "uint8", "float32"], "Model input/output dtype.")
_STRICT = flags.DEFINE_bool("strict", False, "Fail if the written file computes anything in float, or if the quantized model "
                            "leaves ops outside the XNNPACK delegate or is slower than the float model.")
_IMAGE_SIZE, _IMAGE_SCALE = _cli.IMAGE_SIZE, _cli.IMAGE_SCALE  # image folders (shared with the debugger)
_IMAGE_MEAN, _IMAGE_STD, _IMAGE_RESIZE = _cli.IMAGE_MEAN, _cli.IMAGE_STD, _cli.IMAGE_RESIZE
_BUDGET_DROP = flags.DEFINE_float(
    "budget_max_accuracy_drop", None,
    "Automatic mixed precision: keep the most sensitive layers float until the top-1 accuracy drop (points, "
    "against --labels) is at most this; the mixed model is written to --output.")
_BUDGET_SQNR = flags.DEFINE_float(
    "budget_min_sqnr", None,
    "Automatic mixed precision: keep the most sensitive layers float until the output SQNR (dB) is at least this.")
# Post-training algorithms (issue 7, docs/algorithms.md): override the scheme's `algorithms` section.
_CLE = flags.DEFINE_bool("cle", None, "Cross-layer equalization (default: the scheme's algorithms.cle).")
_CLE_RELU6 = flags.DEFINE_enum("cle_relu6", None, ["relu", "skip"],
                               "ReLU6 of an equalized pair: replace it by ReLU, or skip such pairs.")
_HIGH_BIAS = flags.DEFINE_bool("high_bias_absorption", None,
                               "High-bias absorption: move each ReLU channel's always-on bias into the next layer "
                               "(after CLE), narrowing the activation range.")
_BIAS_CORRECTION = flags.DEFINE_enum("bias_correction", None, ["none", "empirical", "analytic"],
                                     "Bias correction of the weight-quantization shift (empirical: calibration "
                                     "data; analytic: batch-norm statistics).")
_ADAROUND = flags.DEFINE_bool("adaround", None, "AdaRound: learned up/down rounding of the weights.")
_ADAROUND_ITERATIONS = flags.DEFINE_integer("adaround_iterations", None, "AdaRound optimisation steps per layer.")
# Runtime (issue 9): XNNPACK delegation report, latency, guard.
_BENCHMARK = flags.DEFINE_bool("benchmark", False,
                               "Measure float vs quantized latency (LiteRT, XNNPACK, batch 1, 1 and all threads, "
                               "median after warm-up) and add it to the runtime report.")
_BENCHMARK_RUNS = flags.DEFINE_integer("benchmark_runs", 100, "Timed invokes per model and thread count.")


def _per_output_choice(text, names, flag, choices):
    """--output_tasks / --output_metrics: one choice for every output, or name=choice pairs."""
    if not text:
        return None
    if "=" not in text:
        if text not in choices:
            raise UsageError(f"--{flag} {text}: choose {', '.join(choices)} (or name=choice pairs)")
        return text
    chosen = {}
    for part in text.split(","):
        name, _, choice = (p.strip() for p in part.partition("="))
        if name not in names:
            raise UsageError(f"--{flag}: no output named {name!r}; the model's outputs are "
                             f"{', '.join(names) or 'unknown'}")
        if choice not in choices:
            raise UsageError(f"--{flag} {part}: choose {', '.join(choices)}")
        chosen[name] = choice
    return chosen


def run(model: str, output: str, calibration_data: str, scheme: str = "int8", report: str | None = None,
        num_calibration_samples=None, num_verification_samples=None, verification_data=None, labels=None,
        range_method=None, io_dtype="int8", batch_size=32, strict=False, image_size=None, image_scale="0,1",
        allow_unsafe=False, out=None, budget_max_accuracy_drop=None, budget_min_sqnr=None, benchmark=False,
        benchmark_runs=100, algorithms=None, image_mean=None, image_std=None, image_resize="stretch",
        custom_objects=None, output_tasks=None, output_metrics=None, merge_calibration=None):
    """Runs the conversion (what the command line does); returns the PTQResult.

    `algorithms` overrides keys of the scheme's algorithms section, e.g.
    {"cle": True, "bias_correction": "empirical"}.  `image_size`, `image_scale`,
    `image_mean`, `image_std` and `image_resize` (the flags' text) apply to a
    folder of images (see `calibrate.ImagePreprocessing`).  `merge_calibration`: the
    calibration parts of every shard (paths), merged instead of a calibration pass.

    Raises the toolkit's errors (see pipeline.ptq); `main` turns them into one line.
    """
    import numpy as np

    from qtoolkit import export, pipeline, verify

    out = out or sys.stdout
    if report:
        export.check_writable(report)
    y = None
    if labels:
        try:
            y = np.load(labels, allow_pickle=False)
            if not isinstance(y, np.ndarray):  # .npz: labels per output name
                y = {k: y[k] for k in y.files}
        except (OSError, ValueError) as e:
            raise UsageError(f"--labels {labels}: cannot read ({str(e).splitlines()[0]})") from None
    size = _cli.pair(image_size, "image_size", int) if image_size else None
    if budget_max_accuracy_drop is not None and not isinstance(y, np.ndarray):
        raise UsageError("--budget_max_accuracy_drop needs --labels (a .npy of the first output's labels)")
    if budget_max_accuracy_drop is not None and budget_min_sqnr is not None:
        raise UsageError("give one of --budget_max_accuracy_drop and --budget_min_sqnr, not both")
    if output:
        export.check_writable(output)
    from qtoolkit import prepare

    # Written only after the runtime guard (below) passed.
    if algorithms:
        scheme = schemes.load(scheme).replace(algorithms=algorithms)
    log = lambda message: print(message, file=out, flush=True)  # noqa: E731
    # Loaded, rewritten and calibrated once: the export, the per-layer summary and mixed precision all read it.
    prepared = prepare.prepare(
        model, calibration_data, scheme, num_calibration_samples=num_calibration_samples,
        num_verification_samples=num_verification_samples, verification_data=verification_data,
        range_method=range_method, batch_size=batch_size, strict=strict, image_size=size,
        image_scale=_cli.pair(image_scale, "image_scale", float), image_mean=image_mean, image_std=image_std,
        image_resize=image_resize, allow_unsafe=allow_unsafe, custom_objects=custom_objects, log=log,
        calibration_parts=merge_calibration or None)
    result = pipeline.ptq(prepared, labels=y, io_dtype=io_dtype, strict=strict, log=log,
                          output_tasks=_per_output_choice(output_tasks, prepared.output_names, "output_tasks",
                                                          verify.TASKS),
                          metrics=_per_output_choice(output_metrics, prepared.output_names, "output_metrics",
                                                     tuple(verify.METRICS)))
    version = prepared.loaded.keras_version
    if version:
        print(f"model: Keras {version}" + (" (read into its tf_keras twin: same layers and weights, checked on "
                                           "the verification samples)" if version == "3" else " (tf_keras)"),
              file=out)
    print(f"scheme {result.scheme.name}: {result.path}", file=out)
    float_lines = result.float_report()  # read from the written file; the scheme's float layers apart
    for note in result.notes:
        if note not in float_lines:
            print(f"note: {note}", file=out)
    if result.folded:
        print(f"folded/fused: {', '.join(result.folded)}", file=out)
    for line in float_lines:
        print(line, file=out)
    if result.calibration:
        c = result.calibration
        how = f" (merged from {c.shards} shards' parts)" if c.shards else ""
        print(f"calibrated {len(c.ranges)} activation ranges ({c.method}) on {c.samples} samples{how} "
              f"in {c.seconds:.1f} s", file=out)
    print(result.inspection.summary(), file=out)
    runtime_report = _runtime_report(prepared, result, benchmark, benchmark_runs, strict, out)
    if output:
        export.write_atomic(output, result.tflite)
        result = dataclasses.replace(result, output=output)
    print(f"wrote {output}" if output else "no --output: nothing written", file=out)
    outputs = "each output against its own float twin" if len(result.per_output) > 1 else "model output"
    print(f"\nverification (LiteRT interpreter, {next(iter(result.comparisons.values())).samples} held-out "
          f"samples, {outputs}):", file=out)
    print(result.table(), file=out)
    _debug_summary(prepared, result, model, calibration_data, output, y, io_dtype, budget_max_accuracy_drop,
                   budget_min_sqnr, out)
    if report:
        from qtoolkit.export import write_atomic

        data = {**result.to_dict(), "runtime": runtime_report.to_dict()}
        write_atomic(report, (json.dumps(data, indent=2, default=_cli.json_default) + "\n").encode())
        print(f"report: {report}", file=out)
    return result


def _debug_summary(prepared, result, model, calibration_data, output, y, io_dtype, budget_max_accuracy_drop,
                   budget_min_sqnr, out):
    """The three most sensitive layers (and mixed precision when a budget is given), on the prepared state."""
    from qtoolkit import debug

    if result.calibration is None:  # no qtoolkit calibration (weight-only, int16x8, SavedModel): nothing to rank
        return
    rep = debug.analyze(prepared, num_samples=min(prepared.num_verification, 64), tflite=False)
    print(f"\nmost sensitive layers (only that layer quantized, {rep.samples} samples):", file=out)
    print(debug.worst_layers(rep), file=out)
    where = model if isinstance(model, str) else "MODEL"
    print(f"full per-layer report: python -m qtoolkit.debug --model {where} --calibration_data "
          f"{calibration_data} --scheme {result.scheme.name} --output debug_report", file=out)
    if budget_max_accuracy_drop is None and budget_min_sqnr is None:
        return
    mp = debug.mixed_precision(prepared, output=output, budget_min_sqnr=budget_min_sqnr,
                               budget_max_accuracy_drop=budget_max_accuracy_drop, labels=y, io_dtype=io_dtype)
    print("\n" + mp.summary(), file=out)
    if output:
        print(f"wrote {output} (mixed precision{'' if mp.met else ', budget NOT met'})", file=out)


def _runtime_report(prepared, result, benchmark, runs, strict, out):
    """XNNPACK delegation of the float and quantized models (and latency); warns, or fails when strict."""
    from qtoolkit import export, runtime

    loaded = prepared.loaded
    if loaded.keras_model is not None:
        float_model = export.float_tflite(loaded.keras_model)
    else:
        float_model = export.float_tflite_saved_model(loaded.path)
    threads = sorted({1, os.cpu_count() or 1})
    rt = runtime.report(float_model, result.tflite, benchmark=benchmark, threads=threads, runs=runs,
                        inputs=prepared.verification_inputs)  # timed on a real sample
    print(rt.summary(), file=out)
    problems = rt.problems()
    if problems and strict:
        raise runtime.RuntimeGuardError("; ".join(problems) + "; nothing was written (drop --strict to write it "
                                        "anyway)")
    for problem in problems:
        print(f"warning: {problem}", file=out)
    return rt


def main(argv):
    _cli.require(argv, _MODEL, _OUTPUT, _CALIBRATION)
    return _cli.run(_run_from_flags)


def _run_from_flags():
    run(_MODEL.value, _OUTPUT.value, _CALIBRATION.value, _SCHEME.value, _REPORT.value, _NUM_CAL.value,
            _NUM_VER.value, _VER_DATA.value, _LABELS.value, _RANGE.value, _IO.value, _BATCH.value, _STRICT.value,
            _IMAGE_SIZE.value, _IMAGE_SCALE.value, _UNSAFE.value,
            budget_max_accuracy_drop=_BUDGET_DROP.value, budget_min_sqnr=_BUDGET_SQNR.value,
            benchmark=_BENCHMARK.value, benchmark_runs=_BENCHMARK_RUNS.value, algorithms=_algorithm_flags(),
            image_mean=_IMAGE_MEAN.value, image_std=_IMAGE_STD.value, image_resize=_IMAGE_RESIZE.value,
            custom_objects=_cli.CUSTOM_OBJECTS.value, output_tasks=_TASKS.value, output_metrics=_METRICS.value,
            merge_calibration=_MERGE.value)


def _algorithm_flags() -> dict:
    """The algorithm flags given on the command line, as scheme `algorithms` keys."""
    given = {"cle": _CLE.value, "cle_relu6": _CLE_RELU6.value, "high_bias_absorption": _HIGH_BIAS.value,
             "bias_correction": _BIAS_CORRECTION.value,
             "adaround": _ADAROUND.value, "adaround_iterations": _ADAROUND_ITERATIONS.value}
    return {k: v for k, v in given.items() if v is not None}


def entry_point():
    app.run(main)


if __name__ == "__main__":
    entry_point()
