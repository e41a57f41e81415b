"""Calibration: observers and range methods, data sources, the calibration pass.

    from qtoolkit import calibrate
    src = calibrate.open_source("calib.npy", specs)
    result = calibrate.calibrate(rewritten, src, num_samples=500, scheme=scheme)
"""

from qtoolkit.calibrate.calibrator import Calibration, calibrate
from qtoolkit.calibrate.data import DataError, Source, open_source
from qtoolkit.calibrate.images import IMAGE_EXTENSIONS, RESIZE_POLICIES, ImagePreprocessing
from qtoolkit.calibrate.observers import (EMAObserver, EntropyObserver, MinMaxObserver, MSEObserver,
                                          PercentileObserver, make_observer)

__all__ = ["calibrate", "Calibration", "open_source", "Source", "DataError", "ImagePreprocessing",
           "RESIZE_POLICIES", "IMAGE_EXTENSIONS", "make_observer",
           "MinMaxObserver", "EMAObserver", "PercentileObserver", "MSEObserver", "EntropyObserver"]
