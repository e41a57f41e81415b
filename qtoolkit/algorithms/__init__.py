"""Post-training algorithms that change only weights, biases and ranges.

    from qtoolkit import algorithms
    algorithms.before_calibration(rewritten, scheme.algorithms, model)     # CLE, high-bias absorption
    algorithms.after_calibration(rewritten, scheme.algorithms, x, model)   # AdaRound, bias correction

Order (as the papers recommend): cross-layer equalization on the float
folded weights, then activation calibration, then AdaRound, then bias
correction of whatever shift the final weights leave.  The exported model has
the same ops as plain PTQ.
"""

from __future__ import annotations

import time

from qtoolkit.algorithms import adaround as _adaround
from qtoolkit.algorithms import bias_correction as _bc
from qtoolkit.algorithms import cle as _cle


def needs_rewrite(options) -> bool:
    """True when any algorithm is enabled (they all work on qtoolkit's rewritten model)."""
    return options.cle or options.high_bias_absorption or options.adaround or options.bias_correction != "none"


def needs_data(options) -> bool:
    """True when the options need calibration inputs held in memory."""
    return options.adaround or options.bias_correction == "empirical"


def before_calibration(rewritten, options, model=None) -> dict:
    """Cross-layer equalization, then high-bias absorption (each if enabled). Returns a report dict.

    `model` is the original Keras model (its batch norms give absorption's statistics).
    """
    report = {}
    if options.cle:
        t0 = time.perf_counter()
        scales = _cle.equalize(rewritten, relu6=options.cle_relu6)
        report["cle"] = {"pairs": len(scales), "seconds": time.perf_counter() - t0}
        report["cle_scales"] = scales
    if options.high_bias_absorption:
        t0 = time.perf_counter()
        stats = _bc.batch_norm_stats(model, rewritten, report.get("cle_scales"))
        moved = _cle.absorb_high_bias(rewritten, stats)
        channels = int(sum((c > 0).sum() for c in moved.values()))
        report["high_bias_absorption"] = {"layers": len(moved), "channels": channels,
                                          "seconds": time.perf_counter() - t0}
        # The absorbing layers' pre-activation means drop by c: what analytic bias correction must see.
        report["bn_stats"] = {name: (beta - moved.get(name, 0.0), gamma) for name, (beta, gamma) in stats.items()}
    return report


def after_calibration(rewritten, options, inputs=None, model=None, report=None, log=None) -> dict:
    """AdaRound, then bias correction (each if enabled). Returns the report dict, extended."""
    report = dict(report or {})
    if options.adaround:
        times = _adaround.adaround(rewritten, inputs, options.adaround_iterations, options.adaround_reg, log=log)
        report["adaround"] = {"iterations": options.adaround_iterations, "seconds": times}
    if options.bias_correction == "empirical":
        t0 = time.perf_counter()
        shifts = _bc.correct_empirical(rewritten, inputs)
        report["bias_correction"] = {"kind": "empirical", "layers": len(shifts), "seconds": time.perf_counter() - t0}
    elif options.bias_correction == "analytic":
        t0 = time.perf_counter()
        stats = report.get("bn_stats") or _bc.batch_norm_stats(model, rewritten, report.get("cle_scales"))
        shifts = _bc.correct_analytic(rewritten, stats)
        report["bias_correction"] = {"kind": "analytic", "layers": len(shifts), "seconds": time.perf_counter() - t0}
    report.pop("cle_scales", None)
    report.pop("bn_stats", None)
    return report
