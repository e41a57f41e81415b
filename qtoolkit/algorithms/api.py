"""The interface of a post-training algorithm: what the registry in `qtoolkit.algorithms` holds.

    class MyAlgorithm:                      # satisfies Algorithm
        stage = "after_calibration"
        def needs_data(self, options): return False
        def run(self, rewritten, options, state): ...; return {"layers": 3, "seconds": 0.1}

An algorithm changes only weights, biases and ranges of qtoolkit's rewritten
model (never its ops), reads its options from the scheme's `algorithms`
section (`schemes.Algorithms`), and returns its report entry. `State` is what
the algorithms of one run hand each other (CLE's scales, the batch-norm
statistics after high-bias absorption).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Protocol

STAGES = ("before_calibration", "after_calibration")


@dataclasses.dataclass
class State:
    """What one run's algorithms share.

    Attributes:
      model: the user's float Keras model (its batch norms give statistics; never modified).
      inputs: calibration samples held in memory (one array per input) for algorithms that need data, or None.
      log: progress messages, or None.
      progress: whether long algorithms show a progress bar (on stderr, when it is a terminal).
      cle_scales: per-pair equalization scales, once CLE ran.
      bn_stats: layer -> (beta, gamma) of the pre-activation statistics, once high-bias absorption moved them.
    """

    model: Any = None
    inputs: Optional[list] = None
    log: Optional[Callable[[str], None]] = None
    progress: bool = True
    cle_scales: Optional[dict] = None
    bn_stats: Optional[dict] = None


class Algorithm(Protocol):
    """One post-training algorithm (see the module docstring)."""

    stage: str  # one of STAGES: whether it runs on the float folded weights or after the ranges are calibrated

    def needs_data(self, options) -> bool:
        """True when these options need calibration inputs held in memory."""

    def run(self, rewritten, options, state: State) -> dict:
        """Applies the algorithm to `rewritten` in place; returns its report entry (with "seconds")."""
