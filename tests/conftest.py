"""Shared test set-up: Keras 2 before TensorFlow, absl flags parsed, seeds."""

import os
import sys

os.environ["TF_USE_LEGACY_KERAS"] = "1"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import qtoolkit  # noqa: E402,F401  (sets the Keras flavour first)
from absl import flags  # noqa: E402

# absl flags must be parsed before a flag value is read; pytest owns argv.
if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()

sys.setrecursionlimit(max(sys.getrecursionlimit(), 10000))
