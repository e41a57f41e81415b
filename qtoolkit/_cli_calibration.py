"""The calibration flags that `python -m qtoolkit.convert` and `python -m qtoolkit.calibrate` share.

Defined once (absl flags are process-wide) and adopted by exactly those two tools, so that the debugger's
--help does not list flags it would ignore:

    from qtoolkit import _cli_calibration as calibration_flags
    flags.adopt_module_key_flags(calibration_flags)
"""

from absl import flags

from qtoolkit import schemes  # plain data and YAML, no TensorFlow

BATCH_SIZE = flags.DEFINE_integer("batch_size", 32, "Calibration batch size.")
RANGE_METHOD = flags.DEFINE_enum("range_method", None, list(schemes.RANGE_METHODS),
                                 "Override the scheme's activation range method.")
MERGE_CALIBRATION = flags.DEFINE_list(
    "merge_calibration", None, "Calibration parts (.npz, comma-separated) written by `python -m qtoolkit.calibrate "
    "--calibration_shard i/n`, one per shard (or parts already merged): their merged ranges are used instead of a "
    "calibration pass, the same ranges one pass over those samples gives; give the --calibration_data, "
    "--num_calibration_samples, --scheme and --batch_size the shards were given.")
