"""One progress bar for every long step (calibration, the choice of ranges, AdaRound).

    bar = progress_bar(len(layers), enabled, "adaround", "layer")
    bar.set_postfix_str(name); bar.update(1); bar.close()

On stderr, gone when done, and off when stderr is not a terminal (tqdm's disable=None) or when the caller
passes enabled=False (`progress=False` in the Python API).
"""

from __future__ import annotations

import sys


class _NoBar:
    def set_postfix_str(self, text):
        pass

    def update(self, n):
        pass

    def close(self):
        pass


def progress_bar(total: int, enabled: bool, desc: str, unit: str):
    """A tqdm bar over `total` units, or an object with the same methods that shows nothing."""
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, leave=False, disable=None)
