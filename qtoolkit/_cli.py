"""What every qtoolkit command line shares: the common flags, one error style, signals, JSON.

    from absl import app, flags
    from qtoolkit import _cli

    flags.adopt_module_key_flags(_cli)          # the shared flags show in the tool's --help
    _EXTRA = flags.DEFINE_integer("num_samples", None, "...")

    def main(argv):
        _cli.require(argv, _cli.MODEL, _cli.CALIBRATION)
        return _cli.run(lambda: work(_cli.MODEL.value, ...))

`run` gives every tool the same behaviour: a `QtoolkitError` is one
`error: ...` line on stderr and exit code 1 (the regression job uses 2 for
its own errors); Ctrl-C and SIGTERM end the run cleanly with exit code 130
and nothing written; TensorFlow's native log goes to a file unless
--verbose, which also lets the traceback through.  Flags are defined once
here, so the tools can live in one process (tests, notebooks) without
clashing.
"""

from __future__ import annotations

import logging
import signal
import sys
from typing import Callable

from absl import app, flags

from qtoolkit import _env, schemes  # schemes: plain data and YAML, no TensorFlow
from qtoolkit.errors import QtoolkitError

MODEL = flags.DEFINE_string("model", None, "SavedModel folder, .keras or .h5 file (tf_keras / Keras 2).")
CALIBRATION = flags.DEFINE_string(
    "calibration_data", None,
    ".npy (samples on axis 0, preprocessed as the model expects), .npz (one array per input name), "
    "a folder of images, or TFRecord files of tf.train.Examples with a feature per input name (calib.tfrecord, "
    "or a quoted glob such as 'calib-*.tfrecord'; streamed).")
SCHEME = flags.DEFINE_string("scheme", "int8", f"Preset name ({', '.join(schemes.preset_names())}) "
                             "or a scheme .yaml file.")
OUTPUT = flags.DEFINE_string("output", None, "Where to write the result: the .tflite file (convert, atomically) "
                             "or the report folder (debug: replaced atomically; regress: default "
                             "regression_report).")
NUM_CALIBRATION = flags.DEFINE_integer(
    "num_calibration_samples", None, "Calibration samples (default: up to 500, leaving the verification samples).")
UNSAFE = flags.DEFINE_bool("allow_unsafe_deserialization", False,
                           "Allow models with serialized Python code (Lambda layers). Only for trusted files.")
CUSTOM_OBJECTS = flags.DEFINE_string(
    "custom_objects", None, "A Python file defining the model's own classes (custom layers, a subclassed model), "
    "for a model file that names them; it is imported, so its code runs. A `custom_objects` dict in it is used "
    "if present, else every class it defines.")
VERBOSE = flags.DEFINE_bool("verbose", False, "Show Python tracebacks and TensorFlow logs on errors.")
# A folder of images as --calibration_data: decoded to the model's channel count, resized, scaled, normalized
# (in that order; the run prints what it did in one line). See qtoolkit.calibrate.ImagePreprocessing.
IMAGE_SIZE = flags.DEFINE_string("image_size", None, "Image folders: HxW to resize images to (default: the model's "
                                 "input size).")
IMAGE_RESIZE = flags.DEFINE_enum("image_resize", "stretch", ["stretch", "crop", "pad"],
                                 "Image folders: how images reach --image_size: stretch (aspect ratio not kept), "
                                 "crop (scale to cover, keep the centre) or pad (scale to fit, keep the aspect "
                                 "ratio, black borders).")
IMAGE_SCALE = flags.DEFINE_string("image_scale", "0,1", "Image folders: the real range pixel values 0..255 map to, "
                                  "e.g. -1,1.")
IMAGE_MEAN = flags.DEFINE_string("image_mean", None, "Image folders: subtracted after --image_scale, one value or "
                                 "one per channel, e.g. 0.485,0.456,0.406 (default: none).")
IMAGE_STD = flags.DEFINE_string("image_std", None, "Image folders: divides after --image_mean, one value or one per "
                                "channel, e.g. 0.229,0.224,0.225 (default: none).")


def require(argv, *required) -> None:
    """Raises app.UsageError (exit code 2 with the usage) for stray arguments or missing required flags."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    missing = [f"--{f.name}" for f in required if not f.value]
    if missing:
        raise app.UsageError(f"missing required flag(s): {', '.join(missing)}")


def pair(text: str, name: str, cast):
    """Two numbers from a flag's text, "224x224" (cast int) or "0,1" (cast float); UsageError naming the flag."""
    from qtoolkit.errors import UsageError

    try:
        a, b = text.replace("x", ",").split(",")
        return cast(a), cast(b)
    except ValueError:
        raise UsageError(f"--{name} must look like {'224x224' if cast is int else '0,1'}, got {text!r}") from None


def run(body: Callable[[], int | None], error_code: int = 1,
        interrupted: str = "interrupted; nothing was written (an existing output file is unchanged)") -> int:
    """Runs a tool's body with the shared error, signal and logging behaviour; returns the exit code.

    Args:
      body: does the work; returns an exit code or None (0).
      error_code: the exit code of a QtoolkitError (one `error:` line).
      interrupted: what the `error:` line says on Ctrl-C / SIGTERM (exit code 130).
    """
    from absl import logging as absl_logging

    verbose = VERBOSE.value
    absl_logging.set_verbosity(absl_logging.INFO if verbose else absl_logging.ERROR)
    logging.getLogger("tensorflow").setLevel(logging.DEBUG if verbose else logging.ERROR)
    # SIGTERM (CI timeouts, `kill`) ends the run like Ctrl-C: cleanly, nothing written.
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        with _env.quiet_native_stderr(enabled=not verbose):
            code = body()
    except QtoolkitError as e:
        if verbose:
            raise
        print(f"error: {e}", file=sys.stderr)
        return error_code
    except KeyboardInterrupt:
        print(f"error: {interrupted}", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    return code or 0


def _terminate(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def json_default(value):
    """`json.dumps(..., default=json_default)`: NumPy scalars and arrays, types, and anything else as text."""
    import numpy as np

    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, type):
        return value.__name__
    return str(value)
