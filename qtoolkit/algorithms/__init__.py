"""Post-training algorithms that change only weights, biases and ranges.

    from qtoolkit import algorithms
    report = algorithms.before_calibration(rewritten, scheme.algorithms, model)       # CLE, high-bias absorption
    report = algorithms.after_calibration(rewritten, scheme.algorithms, x, model, report)  # AdaRound, bias corr.

Order (as the papers recommend): cross-layer equalization on the float
folded weights, then activation calibration, then AdaRound, then bias
correction of whatever shift the final weights leave.  The exported model has
the same ops as plain PTQ.

One registry, `REGISTRY`, keyed by the scheme's algorithm names
(`schemes.ALGORITHM_NAMES`, which also fixes the order); each entry is an
`api.Algorithm`. Adding an algorithm: its options in `schemes.Algorithms`
(and its name in ALGORITHM_NAMES), one class here, its module beside this one.
"""

from __future__ import annotations

import time

from qtoolkit.algorithms import adaround as _adaround
from qtoolkit.algorithms import bias_correction as _bc
from qtoolkit.algorithms import cle as _cle
from qtoolkit.algorithms.api import Algorithm, State
from qtoolkit.schemes import ALGORITHM_NAMES


class _CLE:
    stage = "before_calibration"

    def needs_data(self, options) -> bool:
        return False

    def run(self, rewritten, options, state: State) -> dict:
        t0 = time.perf_counter()
        state.cle_scales = _cle.equalize(rewritten, relu6=options.cle_relu6)
        return {"pairs": len(state.cle_scales), "seconds": time.perf_counter() - t0}


class _HighBiasAbsorption:
    stage = "before_calibration"

    def needs_data(self, options) -> bool:
        return False

    def run(self, rewritten, options, state: State) -> dict:
        t0 = time.perf_counter()
        stats = _bc.batch_norm_stats(state.model, rewritten, state.cle_scales)
        moved = _cle.absorb_high_bias(rewritten, stats)
        # The absorbing layers' pre-activation means drop by c: what analytic bias correction must see.
        state.bn_stats = {name: (beta - moved.get(name, 0.0), gamma) for name, (beta, gamma) in stats.items()}
        channels = int(sum((c > 0).sum() for c in moved.values()))
        return {"layers": len(moved), "channels": channels, "seconds": time.perf_counter() - t0}


class _AdaRound:
    stage = "after_calibration"

    def needs_data(self, options) -> bool:
        return True

    def run(self, rewritten, options, state: State) -> dict:
        times = _adaround.adaround(rewritten, state.inputs, options.adaround_iterations, options.adaround_reg,
                                   log=state.log, progress=state.progress)
        return {"iterations": options.adaround_iterations, "seconds": times}


class _BiasCorrection:
    stage = "after_calibration"

    def needs_data(self, options) -> bool:
        return options.bias_correction == "empirical"

    def run(self, rewritten, options, state: State) -> dict:
        t0 = time.perf_counter()
        if options.bias_correction == "empirical":
            shifts = _bc.correct_empirical(rewritten, state.inputs)
        else:
            stats = state.bn_stats or _bc.batch_norm_stats(state.model, rewritten, state.cle_scales)
            shifts = _bc.correct_analytic(rewritten, stats)
        return {"kind": options.bias_correction, "layers": len(shifts), "seconds": time.perf_counter() - t0}


REGISTRY: dict[str, Algorithm] = {"cle": _CLE(), "high_bias_absorption": _HighBiasAbsorption(),
                                  "adaround": _AdaRound(), "bias_correction": _BiasCorrection()}
assert tuple(REGISTRY) == ALGORITHM_NAMES, "REGISTRY must list schemes.ALGORITHM_NAMES, in that order"


def needs_rewrite(options) -> bool:
    """True when any algorithm is enabled (they all work on qtoolkit's rewritten model)."""
    return bool(options.enabled())


def needs_data(options) -> bool:
    """True when the options need calibration inputs held in memory."""
    return any(REGISTRY[name].needs_data(options) for name in options.enabled())


def _run_stage(stage, rewritten, options, state: State, report: dict) -> dict:
    for name in options.enabled():
        algorithm = REGISTRY[name]
        if algorithm.stage == stage:
            report[name] = algorithm.run(rewritten, options, state)
    return report


def before_calibration(rewritten, options, model=None) -> dict:
    """The algorithms that work on the float folded weights (CLE, high-bias absorption). Returns a report dict.

    `model` is the original Keras model (its batch norms give absorption's statistics). The report carries the
    state the later algorithms need under "_state"; `after_calibration` removes it.
    """
    state = State(model=model)
    return _run_stage("before_calibration", rewritten, options, state, {"_state": state})


def after_calibration(rewritten, options, inputs=None, model=None, report=None, log=None,
                      progress: bool = True) -> dict:
    """The algorithms that run once ranges are calibrated (AdaRound, then bias correction). Returns the report.

    `progress` shows AdaRound's progress bar (layers done, the current one) on stderr when it is a terminal.
    """
    report = dict(report or {})
    state = report.pop("_state", None) or State(model=model)
    state.inputs, state.log, state.progress = inputs, log, progress
    state.model = state.model if state.model is not None else model
    return _run_stage("after_calibration", rewritten, options, state, report)


__all__ = ["REGISTRY", "Algorithm", "State", "needs_rewrite", "needs_data", "before_calibration",
           "after_calibration"]
