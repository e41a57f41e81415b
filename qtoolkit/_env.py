"""Process set-up that must happen before TensorFlow is imported.

qtoolkit works on Keras 2 models through the `tf_keras` package, because
TensorFlow Model Optimization (TFMOT), whose quantizer and wrapper interfaces
qtoolkit builds on, only accepts Keras 2 layers.  TensorFlow picks the Keras
flavour behind `tf.keras` once, at import time, from `TF_USE_LEGACY_KERAS`; so
every qtoolkit entry point imports this module first.

    import qtoolkit  # sets TF_USE_LEGACY_KERAS=1 if TensorFlow is not loaded yet
"""

import os
import sys
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

if "tensorflow" in sys.modules and os.environ.get("TF_USE_LEGACY_KERAS") != "1":
    warnings.warn(
        "TensorFlow was imported before qtoolkit without TF_USE_LEGACY_KERAS=1; "
        "qtoolkit uses tf_keras (Keras 2) directly, but tf.keras in this process "
        "is Keras 3. Import qtoolkit first, or set TF_USE_LEGACY_KERAS=1.",
        stacklevel=2,
    )
os.environ["TF_USE_LEGACY_KERAS"] = "1"
# TensorFlow prints oneDNN/CUDA notices at import unless this is set explicitly
# (1 is TensorFlow's default on x86, so behaviour does not change).
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")


class quiet_native_stderr:
    """Sends native (C++) writes to stderr to a file while Python keeps the terminal.

    TensorFlow's C++ runtime logs CUDA probes and converter diagnostics
    straight to file descriptor 2, past Python's logging.  Command-line tools
    use this so a user sees progress bars and one clear error line; the
    native log is kept in `self.log_path` for --verbose runs and bug reports.
    """

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.log_path = None

    def __enter__(self):
        if not self.enabled:
            return self
        import tempfile

        sys.stderr.flush()
        fd, self.log_path = tempfile.mkstemp(prefix="qtoolkit-native-", suffix=".log")
        self._saved = os.dup(2)
        os.dup2(fd, 2)
        os.close(fd)
        self._old_stderr = sys.stderr
        sys.stderr = os.fdopen(os.dup(self._saved), "w", buffering=1)
        return self

    def __exit__(self, *exc):
        if not self.enabled:
            return False
        sys.stderr.flush()
        os.dup2(self._saved, 2)
        os.close(self._saved)
        sys.stderr.close()
        sys.stderr = self._old_stderr
        if exc[0] is None and self.log_path:
            os.unlink(self.log_path)
            self.log_path = None
        return False
