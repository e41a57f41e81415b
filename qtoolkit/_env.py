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
