"""Calibration: observers and range methods, data sources, the calibration pass.

    from qtoolkit import calibrate
    src = calibrate.open_source("calib.npy", specs)
    result = calibrate.calibrate(rewritten, src, num_samples=500, scheme=scheme)

In parts, across processes (calibrate/shards.py; the command line: `python -m qtoolkit.calibrate`):

    part = prepare(model, "calib.tfrecord", num_calibration_samples=10000,
                   calibration_shard=(i, n)).calibration_part    # in process i of n
    part.save(f"part{i}.npz")
    ptq(model, "calib.tfrecord", num_calibration_samples=10000, calibration_parts=paths)  # one pass's ranges

The names below are imported on first use (PEP 562), so that `python -m qtoolkit.calibrate` can quiet
TensorFlow's native start-up log before TensorFlow is imported, as the other command lines do.
"""

import importlib

_NAMES = {
    "calibrator": ("calibrate", "Calibration", "Observed"),
    "data": ("open_source", "Source", "DataError"),
    "images": ("ImagePreprocessing", "RESIZE_POLICIES", "IMAGE_EXTENSIONS"),
    "records": ("write_records",),
    "shards": ("CalibrationPart", "load_part", "merge_parts"),
    "observers": ("make_observer", "MinMaxObserver", "EMAObserver", "PercentileObserver", "MSEObserver",
                  "EntropyObserver"),
}
_MODULES = ("calibrator", "data", "images", "records", "shards", "observers", "select")
__all__ = [name for names in _NAMES.values() for name in names]


def __getattr__(name):
    for module, names in _NAMES.items():
        if name in names:
            return getattr(importlib.import_module(f"{__name__}.{module}"), name)
    if name in _MODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(__all__ + list(_MODULES))
