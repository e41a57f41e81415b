"""The debugger's command line: `python -m qtoolkit.debug --model M --calibration_data D --output DIR`.

Prints the output SQNR and the ranked table, and the report folder; exits 1
with one `error:` line for a qtoolkit error (bad model, data, scheme,
export). Its --help shows the `qtoolkit.debug` docstring.
"""

import os

from absl import app, flags

from qtoolkit import _cli
from qtoolkit.debug.measure import analyze
from qtoolkit.debug.report_files import format_db

flags.adopt_module_key_flags(_cli)  # --model, --calibration_data, --scheme, --output, ... shown in --help
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", None, "Held-out samples measured (default up to 200).")
_TFLITE = flags.DEFINE_bool("tflite", True, "Also measure the exported TFLite model's intermediate tensors.")


def main(argv):
    """absl main: runs `analyze` with the flags; returns the exit code (0, or 1 on a qtoolkit error)."""
    _cli.require(argv, _cli.MODEL, _cli.CALIBRATION, _cli.OUTPUT)
    return _cli.run(_run_from_flags, interrupted="interrupted; the report folder was not written")


def _run_from_flags():
    output = _cli.OUTPUT.value
    report = analyze(_cli.MODEL.value, _cli.CALIBRATION.value, _cli.SCHEME.value, output,
                     num_calibration_samples=_cli.NUM_CALIBRATION.value, num_samples=_NUM_SAMPLES.value,
                     tflite=_TFLITE.value, allow_unsafe=_cli.UNSAFE.value, image_size=_cli.IMAGE_SIZE.value,
                     image_scale=_cli.IMAGE_SCALE.value, image_mean=_cli.IMAGE_MEAN.value,
                     image_std=_cli.IMAGE_STD.value, image_resize=_cli.IMAGE_RESIZE.value)
    print(f"output SQNR: simulated {format_db(report.output_sqnr['simulated'])} dB, "
          f"TFLite {format_db(report.output_sqnr.get('tflite'))} dB ({report.samples} held-out samples)")
    for key, value in report.output_sqnr.items():
        if " " in key:  # a model with several outputs: each one's
            print(f"  output {key.split(' ', 1)[1]!r} ({key.split(' ')[0]}): {format_db(value)} dB")
    print(report.table())
    print(f"report: {os.path.join(output, 'index.html')} (also report.md, report.json, PNG plots)")


if __name__ == "__main__":
    from qtoolkit import debug

    __doc__ = debug.__doc__  # absl's --help prints the main module's docstring: the package's, as before
    app.run(main)
