"""Process set-up shared by every entry point, with no effect on which Keras the user's code gets.

qtoolkit reads Keras 2 models through the `tf_keras` package directly, never
through `tf.keras`, whose flavour TensorFlow picks once, at its first use,
from `TF_USE_LEGACY_KERAS`.  TensorFlow Model Optimization (TFMOT), whose
quantizer interface the Keras 2 layers build on, sets that variable to 1 when
it is imported and then touches `tf.keras`: imported plainly, it would switch
the user's `tf.keras` from Keras 3 to tf_keras for the whole process.
`import_tfmot_quantizers` first lets `tf.keras` resolve as the user's
environment says, then imports TFMOT and restores the variable.

    from qtoolkit import _env
    tfmot_quantizers = _env.import_tfmot_quantizers()
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# TensorFlow prints oneDNN/CUDA notices at import unless this is set explicitly
# (1 is TensorFlow's default on x86, so behaviour does not change).
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")


def import_tfmot_quantizers():
    """TFMOT's `quantizers` module, imported without changing the user's `tf.keras` or environment."""
    import tensorflow as tf

    before = os.environ.get("TF_USE_LEGACY_KERAS")
    getattr(tf.keras, "__version__", None)  # tf.keras decides its flavour now, from the user's environment
    try:
        from tensorflow_model_optimization.quantization.keras import quantizers
    finally:
        if before is None:
            os.environ.pop("TF_USE_LEGACY_KERAS", None)
        else:
            os.environ["TF_USE_LEGACY_KERAS"] = before
    return quantizers


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
