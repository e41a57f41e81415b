"""Calibration: observers and range methods, data sources, the calibration pass.

    from qtoolkit import calibrate
    src = calibrate.open_source("calib.npy", specs)
    result = calibrate.calibrate(rewritten, src, num_samples=500, scheme=scheme)
"""

from qtoolkit.calibrate.calibrator import Calibration, calibrate
from qtoolkit.calibrate.data import RESIZE_POLICIES, DataError, ImagePreprocessing, Source, open_source
from qtoolkit.calibrate.observers import (EMAObserver, EntropyObserver, MinMaxObserver, MSEObserver,
                                          PercentileObserver, make_observer)

__all__ = ["calibrate", "Calibration", "open_source", "Source", "DataError", "ImagePreprocessing",
           "RESIZE_POLICIES", "make_observer",
           "MinMaxObserver", "EMAObserver", "PercentileObserver", "MSEObserver", "EntropyObserver"]
