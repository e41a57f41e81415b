"""Shared test set-up: TensorFlow's logs, absl flags parsed.

The tests run as a user's process does: TF_USE_LEGACY_KERAS is left as the environment has it (tf.keras is
Keras 3 unless set); the tests build Keras 2 models with `tf_keras` and Keras 3 ones with `keras`.
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import qtoolkit  # noqa: E402,F401
from absl import flags  # noqa: E402

# absl flags must be parsed before a flag value is read; pytest owns argv.
if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()

sys.setrecursionlimit(max(sys.getrecursionlimit(), 10000))
