"""Range observers: streaming statistics of a tensor -> a quantization range.

    obs = make_observer(schemes.ActivationQuant(method="percentile", percentile=99.9))
    for batch in batches:
        obs.update(batch)
    lo, hi = obs.range()

Memory is constant in the number of samples: min/max observers keep two
numbers, histogram observers `num_bins` counts over a range that widens as
data arrives (old counts are re-binned).  Methods:
  * minmax — the extreme values seen;
  * ema — exponential moving average of each batch's min and max (the
    paper's choice for activations; TensorFlow's MovingAverageQuantize);
  * percentile — the two-sided percentiles (100 - p, p) of the histogram;
  * mse — the clipping range, scaled down from [min, max], that minimises the
    quantization mean squared error of the histogram;
  * entropy — the clipping range that minimises the KL divergence between
    the histogram and its quantized version (TensorRT's calibrator, on both
    sides of zero for asymmetric ranges);
  * auto — per tensor, min/max or MSE, whichever gives the lower error of the
    model's outputs: the observer keeps both candidates (`AutoObserver`), the
    calibrator chooses after the pass (`calibrate/select.py`).
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from qtoolkit import quantizers as q
from qtoolkit.schemes import RANGE_METHODS, ActivationQuant
from qtoolkit.errors import NoDataError  # noqa: F401  (raised here; defined with the others)


class Observer(Protocol):
    """Streaming range estimator."""

    def update(self, batch: np.ndarray) -> None: ...

    def range(self) -> tuple[float, float]: ...


class MinMaxObserver:
    """Running min and max."""

    def __init__(self):
        self.lo, self.hi = np.inf, -np.inf

    def update(self, batch: np.ndarray) -> None:
        batch = np.asarray(batch)
        if batch.size:
            self.lo = min(self.lo, float(batch.min()))
            self.hi = max(self.hi, float(batch.max()))

    def range(self) -> tuple[float, float]:
        if self.lo > self.hi:
            raise NoDataError("no data observed")
        return self.lo, self.hi


class EMAObserver:
    """Moving average of batch min/max: r <- decay * r + (1 - decay) * batch; first batch sets r."""

    def __init__(self, decay: float = 0.9):
        self.decay = decay
        self.lo = self.hi = None

    def update(self, batch: np.ndarray) -> None:
        batch = np.asarray(batch)
        if not batch.size:
            return
        lo, hi = float(batch.min()), float(batch.max())
        if self.lo is None:
            self.lo, self.hi = lo, hi
        else:
            self.lo = self.decay * self.lo + (1 - self.decay) * lo
            self.hi = self.decay * self.hi + (1 - self.decay) * hi

    def range(self) -> tuple[float, float]:
        if self.lo is None:
            raise NoDataError("no data observed")
        return self.lo, self.hi


class HistogramObserver:
    """A histogram over [lo, hi] (always containing 0) that widens as needed."""

    def __init__(self, num_bins: int = 2048):
        self.num_bins = num_bins
        self.lo = self.hi = None
        self.counts = np.zeros(num_bins, np.float64)

    def update(self, batch: np.ndarray) -> None:
        batch = np.asarray(batch, np.float32).ravel()
        if not batch.size:
            return
        bmin, bmax = min(float(batch.min()), 0.0), max(float(batch.max()), 0.0)
        if self.lo is None:
            self.lo, self.hi = bmin, max(bmax, bmin + 1e-8)
        elif bmin < self.lo or bmax > self.hi:
            lo, hi = min(bmin, self.lo), max(bmax, self.hi)
            # Widen with headroom so that a slowly growing range re-bins rarely.
            width = hi - lo
            lo = lo - 0.1 * width if bmin < self.lo else lo
            hi = hi + 0.1 * width if bmax > self.hi else hi
            centers = self.centers()
            self.counts, _ = np.histogram(centers, self.num_bins, (lo, hi), weights=self.counts)
            self.counts = self.counts.astype(np.float64)
            self.lo, self.hi = lo, hi
        self.counts += np.histogram(batch, self.num_bins, (self.lo, self.hi))[0]

    def centers(self) -> np.ndarray:
        edges = np.linspace(self.lo, self.hi, self.num_bins + 1)
        return (edges[:-1] + edges[1:]) / 2

    def data_range(self) -> tuple[float, float]:
        """The range of the occupied bins (edges)."""
        if self.lo is None:
            raise NoDataError("no data observed")
        edges = np.linspace(self.lo, self.hi, self.num_bins + 1)
        nz = np.nonzero(self.counts)[0]
        return float(edges[nz[0]]), float(edges[nz[-1] + 1])


class PercentileObserver(HistogramObserver):
    """Keeps the central `percentile` percent: range = (P[100 - p], P[p])."""

    def __init__(self, percentile: float = 99.99, num_bins: int = 2048):
        super().__init__(num_bins)
        self.percentile = percentile

    def range(self) -> tuple[float, float]:
        if self.lo is None:
            raise NoDataError("no data observed")
        cdf = np.cumsum(self.counts) / self.counts.sum()
        edges = np.linspace(self.lo, self.hi, self.num_bins + 1)
        lo_q, hi_q = 1 - self.percentile / 100, self.percentile / 100
        lo = edges[np.searchsorted(cdf, lo_q, side="right")] if lo_q > 0 else self.data_range()[0]
        hi = edges[min(np.searchsorted(cdf, hi_q, side="left") + 1, self.num_bins)] if hi_q < 1 \
            else self.data_range()[1]
        return float(min(lo, 0.0)), float(max(hi, 0.0))


def _candidates(lo: float, hi: float, steps: int = 100) -> list[tuple[float, float]]:
    """Clipping ranges [lo, hi] scaled down by factors from 1 to 0.1."""
    return [(lo * a, hi * a) for a in np.linspace(1.0, 0.1, steps)]


class MSEObserver(HistogramObserver):
    """The clipping range that minimises the quantization MSE of the histogram."""

    def __init__(self, bits: int = 8, symmetric: bool = False, narrow_range: bool = False, num_bins: int = 2048):
        super().__init__(num_bins)
        self.bits, self.symmetric, self.narrow_range = bits, symmetric, narrow_range

    def error(self, lo: float, hi: float) -> float:
        """Expected squared error (per sample) of quantizing the histogram with [lo, hi]."""
        lo_s, hi_s = q.sanitize_range(lo, hi, self.symmetric)
        c = self.centers().astype(np.float32)
        fq = q.fake_quant(c, lo_s, hi_s, self.bits, self.narrow_range)
        return float(np.sum(self.counts * (c.astype(np.float64) - fq) ** 2) / self.counts.sum())

    def errors(self, candidates) -> np.ndarray:
        """`error` of every candidate range at once (one fake quant over bins x candidates)."""
        lo = np.array([c[0] for c in candidates], np.float32)
        hi = np.array([c[1] for c in candidates], np.float32)
        lo_s, hi_s = q.sanitize_range(lo, hi, self.symmetric)
        c = self.centers().astype(np.float32)
        fq = q.fake_quant(np.repeat(c[:, None], len(candidates), axis=1), lo_s, hi_s, self.bits,
                          self.narrow_range, axis=1)
        sq = (c[:, None].astype(np.float64) - fq) ** 2
        return (self.counts[:, None] * sq).sum(axis=0) / self.counts.sum()

    def range(self) -> tuple[float, float]:
        candidates = _candidates(*self.data_range())
        return candidates[int(np.argmin(self.errors(candidates)))]


class EntropyObserver(HistogramObserver):
    """The clipping range that minimises KL(P || Q) (TensorRT's entropy calibration).

    P is the histogram clipped to a candidate range (outliers added to the edge
    bins); Q is P merged into 2^bits levels and spread back uniformly over the
    non-empty bins of each level.
    """

    def __init__(self, bits: int = 8, num_bins: int = 2048):
        super().__init__(num_bins)
        self.levels = 1 << bits

    def _counts_for_kl(self) -> np.ndarray:
        """The histogram with the spikes at zero (ReLU) and at the ends (ReLU6
        saturation) flattened to their neighbours' height: zero is exact on any
        grid and a saturated bound must not be clipped, so neither should drive
        the divergence (pytorch-quantization flattens the zero bin the same way)."""
        counts = self.counts.copy()
        zero = int(np.clip(np.floor(-self.lo / (self.hi - self.lo) * self.num_bins), 0, self.num_bins - 1))
        for spike, neighbour in ((zero, zero + 1 if zero + 1 < self.num_bins else zero - 1),):
            counts[spike] = min(counts[spike], counts[neighbour])
        return counts

    def divergence(self, lo: float, hi: float) -> float:
        edges = np.linspace(self.lo, self.hi, self.num_bins + 1)
        i0 = int(np.clip(np.searchsorted(edges, lo, side="right") - 1, 0, self.num_bins - 1))
        i1 = int(np.clip(np.searchsorted(edges, hi, side="left"), i0 + 1, self.num_bins))
        counts = self._counts_for_kl()
        inner = counts[i0:i1]
        if inner.size < self.levels:
            return np.inf
        # P: the clipped distribution, outliers piled on the edge bins.
        p = inner.copy()
        p[0] += counts[:i0].sum()
        p[-1] += counts[i1:].sum()
        # Q: the in-range counts merged into 2^bits levels, spread back over the
        # non-empty bins of each level (the outliers are what Q loses).
        level = (np.arange(inner.size) * self.levels) // inner.size
        nonzero = inner > 0
        sums = np.bincount(level, weights=inner, minlength=self.levels)
        occupied = np.bincount(level, weights=nonzero, minlength=self.levels)
        qd = np.where(nonzero, sums[level] / np.maximum(occupied[level], 1), 0.0)
        if qd.sum() == 0:
            return np.inf
        p, qd = p / p.sum(), qd / qd.sum()
        mask = p > 0
        return float(np.sum(p[mask] * np.log(p[mask] / np.maximum(qd[mask], 1e-12))))

    def range(self) -> tuple[float, float]:
        lo, hi = self.data_range()
        candidates = _candidates(lo, hi)
        # A bound where the data piles up (a saturating activation such as
        # ReLU6: its top bin holds more than any bin near it) is kept.
        top = np.nonzero(self.counts)[0][-1]
        if top >= 8 and self.counts[top] > 4 * self.counts[top - 8:top].max() \
                and self.counts[top] >= 1e-3 * self.counts.sum():
            candidates = [(c_lo, hi) for c_lo, _ in candidates]
        return min(candidates, key=lambda r: self.divergence(*r))


class AutoObserver(MSEObserver):
    """Both candidates of the "auto" method: the exact min/max and the MSE range.

    `range()` is the MSE range (what a caller that does not select gets);
    `candidates()` gives both, and the calibrator picks one per tensor by the
    model's output error (calibrate/select.py).
    """

    def __init__(self, bits: int = 8, symmetric: bool = False, narrow_range: bool = False, num_bins: int = 2048):
        super().__init__(bits, symmetric, narrow_range, num_bins)
        self.minmax = MinMaxObserver()

    def update(self, batch: np.ndarray) -> None:
        super().update(batch)
        self.minmax.update(batch)

    def candidates(self) -> dict:
        """{"minmax": the extreme values seen, "mse": the MSE clipping range}."""
        return {"minmax": self.minmax.range(), "mse": MSEObserver.range(self)}


def make_observer(acts: ActivationQuant) -> Observer:
    """The observer for a scheme's activation settings (one registry, keyed by method)."""
    factories = {
        "minmax": lambda: MinMaxObserver(),
        "ema": lambda: EMAObserver(acts.ema_decay),
        "percentile": lambda: PercentileObserver(acts.percentile, acts.num_bins),
        "mse": lambda: MSEObserver(acts.bits, acts.symmetric, acts.narrow_range, acts.num_bins),
        "entropy": lambda: EntropyObserver(acts.bits, acts.num_bins),
        "auto": lambda: AutoObserver(acts.bits, acts.symmetric, acts.narrow_range, acts.num_bins),
    }
    assert set(factories) == set(RANGE_METHODS)
    if acts.method not in factories:
        raise ValueError(f"unknown range method {acts.method!r}; methods are {', '.join(factories)}")
    return factories[acts.method]()
