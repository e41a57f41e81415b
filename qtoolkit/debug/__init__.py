"""Per-layer quantization error: where a quantized model loses accuracy, in tables and pictures.

    python -m qtoolkit.debug --model model.keras --calibration_data calib.npy --output report_dir
    report = qtoolkit.debug.analyze("model.keras", "calib.npy", output="report_dir")

For every activation quantizer of the rewritten model (a "layer": the op
whose output it quantizes, with that op's weight quantizer) it measures, on
held-out samples, the SQNR and MSE against the float model:

- sensitivity: only that layer quantized, everything else float; SQNR of the
  model output.
- cumulative: everything quantized; SQNR of that layer's output against the
  float twin's, in the simulation and in the exported TFLite model (its
  intermediate tensors, read with the interpreter's
  experimental_preserve_all_tensors and matched by the quantizer's name).
- local: the error the layer adds to what it receives, estimated from the
  cumulative numbers (noise-to-signal ratio of the layer's output minus that
  of its noisiest quantized input), for both measurements.

It writes a ranked table (report.md, report.json), PNG plots and index.html
into the output folder (a temporary folder renamed into place).

`mixed_precision` uses the sensitivities to keep the fewest layers float so
that a budget (minimum output SQNR, or maximum accuracy drop) is met on the
exported model, measured with the LiteRT interpreter.
"""

# The package, one concept per module:
#   measure.py         Report / LayerError and the per-layer measurement (`analyze`, `worst_layers`)
#   tflite_tensors.py  the exported TFLite model's intermediate tensors, matched to the quantizers
#   mixed.py           `mixed_precision`: the fewest layers kept float to meet a budget
#   report_files.py    the report folder (report.md, report.json, PNG plots, index.html)
#   setup.py           the debugger's view of the shared prepare stage (`setup` -> `Setup`)
#   __main__.py        the command line (`main`)

from qtoolkit import _env  # noqa: F401  (before TensorFlow)
from qtoolkit.debug.measure import LayerError, Report, analyze, worst_layers
from qtoolkit.errors import DebugError
from qtoolkit.debug.mixed import Choice, MixedPrecision, mixed_precision

__all__ = ["analyze", "mixed_precision", "worst_layers", "Report", "LayerError", "Choice", "MixedPrecision",
           "DebugError", "main"]


def __getattr__(name):
    # `main` lives in __main__.py (so that `python -m qtoolkit.debug` runs it with its flags defined in the main
    # module, as absl's --help expects); importing it here eagerly would make runpy warn that
    # qtoolkit.debug.__main__ was imported before being run.
    if name == "main":
        from qtoolkit.debug.__main__ import main

        return main
    raise AttributeError(f"module 'qtoolkit.debug' has no attribute {name!r}")
