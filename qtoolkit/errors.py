"""Every error qtoolkit raises for a user to read: one base, one place.

    from qtoolkit.errors import QtoolkitError
    try:
        qtoolkit.ptq("model.keras", "calib.npy")
    except QtoolkitError as e:      # bad input or a step that cannot be done: the message says what to do
        print(f"error: {e}")

Each message names the problem and the fix in one line; the command-line
tools print it as `error: ...` and exit 1 (see `qtoolkit._cli`).  Every class
also derives from the built-in exception it replaced (ValueError for bad
input, RuntimeError for a failing step), so existing `except ValueError`
code keeps working.  The modules that raise them re-export them under the
same names (`qtoolkit.loading.ModelLoadError`, ...).  Anything else that
escapes is a bug in qtoolkit and keeps its traceback.
"""

from __future__ import annotations


class QtoolkitError(Exception):
    """Base of every user-facing qtoolkit error: the message says what is wrong and how to fix it."""


class UsageError(QtoolkitError, ValueError):
    """Bad command-line flag values or API arguments."""


class ModelLoadError(QtoolkitError, ValueError):
    """The model cannot be loaded; the message says why and what to do."""


class DataError(QtoolkitError, ValueError):
    """Calibration or verification data that cannot be used as given."""


class NoDataError(QtoolkitError, ValueError):
    """An observer was asked for a range before it saw any data."""


class SchemeError(QtoolkitError, ValueError):
    """A quantization scheme that is not valid."""


class UnsupportedModelError(QtoolkitError, ValueError):
    """A model graph qtoolkit cannot rewrite."""


class UnquantizableLayersError(QtoolkitError, ValueError):
    """Some layers would stay float under --strict."""


class ExportError(QtoolkitError, RuntimeError):
    """The TFLite converter failed, or the model is too large to convert."""


class RuntimeGuardError(QtoolkitError, RuntimeError):
    """The quantized model is slower than float or leaves ops outside the delegate (--strict)."""


class RuntimeAbortError(QtoolkitError, RuntimeError):
    """LiteRT crashed (abort, segfault) running a TFLite file; `qtoolkit.contained` kept the process alive.

    Attributes:
      signal_name: "SIGABRT", "SIGSEGV", ... or None when the child process exited without a signal.
    """

    def __init__(self, message: str, signal_name: str | None = None):
        super().__init__(message)
        self.signal_name = signal_name


class DebugError(QtoolkitError, ValueError):
    """The model or scheme cannot be debugged (e.g. weight-only scheme)."""


class ConfigError(QtoolkitError, ValueError):
    """An invalid regression config; the message names the key."""


class Int4Error(QtoolkitError, ValueError):
    """A model cannot be stored with int4 weights."""


class DatasetUnavailable(QtoolkitError, RuntimeError):
    """A data set is not installed; the message says how to install it."""


class ReferenceUnavailable(QtoolkitError, RuntimeError):
    """A reference model's weights are missing; the message says how to train them."""
