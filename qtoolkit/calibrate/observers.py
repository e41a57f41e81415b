"""Range observers: streaming statistics of a tensor -> a quantization range.

    obs = make_observer(schemes.ActivationQuant(method="percentile", percentile=99.9))
    for batch in batches:
        obs.update(batch)
    lo, hi = obs.range()

Memory is constant in the number of samples: min/max observers keep two
numbers, EMA observers two a batch, histogram observers `2 * num_bins` counts
on a power-of-two grid that coarsens exactly as the range widens.  Every
observer `merge`s with one that saw another part of the data into the
observer that saw both (`to_state` / `from_state` carry it between processes:
calibrate/shards.py).  Methods:
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

from typing import Optional, Protocol

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

    def merge(self, other: "MinMaxObserver") -> None:
        """As if this observer had also seen what `other` saw."""
        self.lo, self.hi = min(self.lo, other.lo), max(self.hi, other.hi)

    def range(self) -> tuple[float, float]:
        if self.lo > self.hi:
            raise NoDataError("no data observed")
        return self.lo, self.hi


class EMAObserver:
    """Moving average of batch min/max: r <- decay * r + (1 - decay) * batch; first batch sets r.

    Each batch's extremes are kept (two numbers a batch): the average depends on their order, and merging
    observers of consecutive parts of a stream replays them in order, as one pass would have.
    """

    def __init__(self, decay: float = 0.9):
        self.decay = decay
        self.lo = self.hi = None
        self.extremes: list[tuple[float, float]] = []

    def update(self, batch: np.ndarray) -> None:
        batch = np.asarray(batch)
        if batch.size:
            self._step(float(batch.min()), float(batch.max()))

    def _step(self, lo: float, hi: float) -> None:
        self.extremes.append((lo, hi))
        if self.lo is None:
            self.lo, self.hi = lo, hi
        else:
            self.lo = self.decay * self.lo + (1 - self.decay) * lo
            self.hi = self.decay * self.hi + (1 - self.decay) * hi

    def merge(self, other: "EMAObserver") -> None:
        """Continues with `other`'s batches (`other` saw the part of the stream after this one's)."""
        for lo, hi in list(other.extremes):
            self._step(lo, hi)

    def range(self) -> tuple[float, float]:
        if self.lo is None:
            raise NoDataError("no data observed")
        return self.lo, self.hi


MIN_BIN_WIDTH = 2.0 ** -60  # the grid of a tensor that is all zeros


def _rebinned(index: np.ndarray, counts: np.ndarray, size: int) -> np.ndarray:
    """`counts` moved to bins `index` (the bins past the range seen are empty: they fall off the end)."""
    keep = counts > 0
    return np.bincount(index[keep], weights=counts[keep], minlength=size)


class HistogramObserver:
    """A histogram on a fixed grid: bin k covers [k * width, (k + 1) * width), width a power of two.

    The grid holds the range seen (always with 0) in at least `num_bins` bins: `2 * num_bins` bins are
    kept, the width is the smallest power of two that fits the range in them.  When the range outgrows
    the grid, the width doubles and pairs of bins merge, exactly (no count moves to another bin), so the
    counts depend only on the values seen, not on their order or batching; observers fed disjoint parts
    of the data `merge` into exactly the observer fed all of it (calibration in parts, calibrate/shards.py).
    """

    def __init__(self, num_bins: int = 2048):
        self.num_bins = num_bins
        self.size = 2 * num_bins
        self.width: Optional[float] = None
        self.start = 0  # the grid index of the first bin kept
        self.counts = np.zeros(self.size, np.float64)
        self.minmax = MinMaxObserver()  # the exact extremes: `data_range` is the data's, not a bin edge

    @property
    def lo(self) -> float:
        return self.start * self.width

    @property
    def hi(self) -> float:
        return (self.start + self.size) * self.width

    def edges(self) -> np.ndarray:
        return (self.start + np.arange(self.size + 1)) * self.width

    def centers(self) -> np.ndarray:
        return (self.start + np.arange(self.size) + 0.5) * self.width

    def _fits(self, width: float) -> bool:
        lo, hi = min(self.minmax.lo, 0.0), max(self.minmax.hi, 0.0)
        return np.floor(hi / width) - np.floor(lo / width) < self.size

    def _regrid(self) -> None:
        """The smallest width (>= the present one) that holds the range seen; counts moved exactly."""
        width = self.width if self.width is not None else MIN_BIN_WIDTH
        if self.width is None and self.minmax.hi > self.minmax.lo:
            span = max(self.minmax.hi, 0.0) - min(self.minmax.lo, 0.0)
            width = max(2.0 ** (np.floor(np.log2(span / self.size)) - 1), MIN_BIN_WIDTH)
        while not self._fits(width):
            width *= 2
        start = int(np.floor(min(self.minmax.lo, 0.0) / width))
        if self.width is not None and (width, start) != (self.width, self.start):
            factor = int(round(width / self.width))  # a power of two: bin k -> k // factor, exactly
            index = (self.start + np.arange(self.size)) // factor - start
            self.counts = _rebinned(index, self.counts, self.size)
        self.width, self.start = float(width), start

    def update(self, batch: np.ndarray) -> None:
        batch = np.asarray(batch, np.float32).ravel()
        if not batch.size:
            return
        self.minmax.update(batch)
        self._regrid()
        index = np.floor(batch.astype(np.float64) / self.width).astype(np.int64) - self.start
        self.counts += np.bincount(index, minlength=self.size)

    def merge(self, other: "HistogramObserver") -> None:
        """As if this observer had also seen what `other` saw (same `num_bins`)."""
        if other.width is None:
            return
        if other.size != self.size:
            raise ValueError(f"cannot merge histograms of {self.num_bins} and {other.num_bins} bins")
        parts = [(o.width, o.start, o.counts) for o in (self, other) if o.width is not None]
        self.minmax.merge(other.minmax)
        # Each part's width is the smallest that fits its range, so the smallest fitting the union is at
        # least the larger of them: the grid one pass over all the data would have ended on.
        width = max(w for w, _, _ in parts)
        while not self._fits(width):
            width *= 2
        start = int(np.floor(min(self.minmax.lo, 0.0) / width))
        counts = np.zeros(self.size, np.float64)
        for w, s, c in parts:
            index = (s + np.arange(self.size)) // int(round(width / w)) - start
            counts += _rebinned(index, c, self.size)
        self.width, self.start, self.counts = float(width), start, counts

    def data_range(self) -> tuple[float, float]:
        """The smallest and largest value seen."""
        if self.width is None:
            raise NoDataError("no data observed")
        return self.minmax.range()


class PercentileObserver(HistogramObserver):
    """Keeps the central `percentile` percent: range = (P[100 - p], P[p])."""

    def __init__(self, percentile: float = 99.99, num_bins: int = 2048):
        super().__init__(num_bins)
        self.percentile = percentile

    def range(self) -> tuple[float, float]:
        if self.width is None:
            raise NoDataError("no data observed")
        cdf = np.cumsum(self.counts) / self.counts.sum()
        edges = self.edges()
        lo_q, hi_q = 1 - self.percentile / 100, self.percentile / 100
        lo = edges[np.searchsorted(cdf, lo_q, side="right")] if lo_q > 0 else self.data_range()[0]
        hi = edges[min(np.searchsorted(cdf, hi_q, side="left") + 1, self.size)] if hi_q < 1 \
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
        return float(self.errors([(lo, hi)])[0])

    def _occupied(self) -> tuple[np.ndarray, np.ndarray]:
        """Centers and counts of the bins from the first to the last non-empty one (empty ones add nothing)."""
        nz = np.nonzero(self.counts)[0]
        return self.centers()[nz[0]:nz[-1] + 1], self.counts[nz[0]:nz[-1] + 1]

    def errors(self, candidates) -> np.ndarray:
        """`error` of every candidate range at once (one fake quant over bins x candidates)."""
        lo = np.array([c[0] for c in candidates], np.float32)
        hi = np.array([c[1] for c in candidates], np.float32)
        lo_s, hi_s = q.sanitize_range(lo, hi, self.symmetric)
        c, counts = self._occupied()
        c = c.astype(np.float32)
        fq = q.fake_quant(np.repeat(c[:, None], len(candidates), axis=1), lo_s, hi_s, self.bits,
                          self.narrow_range, axis=1)
        sq = (c[:, None].astype(np.float64) - fq) ** 2
        return (counts[:, None] * sq).sum(axis=0) / counts.sum()

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
        zero = int(np.clip(-self.start, 0, self.size - 1))  # the bin [0, width)
        for spike, neighbour in ((zero, zero + 1 if zero + 1 < self.size else zero - 1),):
            counts[spike] = min(counts[spike], counts[neighbour])
        return counts

    def divergence(self, lo: float, hi: float) -> float:
        edges = self.edges()
        i0 = int(np.clip(np.searchsorted(edges, lo, side="right") - 1, 0, self.size - 1))
        i1 = int(np.clip(np.searchsorted(edges, hi, side="left"), i0 + 1, self.size))
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

    def candidates(self) -> dict:
        """{"minmax": the extreme values seen, "mse": the MSE clipping range}."""
        return {"minmax": self.minmax.range(), "mse": MSEObserver.range(self)}


_KINDS = {c.__name__: c for c in (MinMaxObserver, EMAObserver, PercentileObserver, MSEObserver, EntropyObserver,
                                  AutoObserver)}


def to_state(observer) -> dict:
    """An observer's whole state as plain data: numbers, strings and numpy arrays (for `np.savez`, no pickle)."""
    state = {"kind": type(observer).__name__}
    for key, value in vars(observer).items():
        if isinstance(value, MinMaxObserver):
            value = to_state(value)
        elif key == "extremes":
            value = np.asarray(value, np.float64).reshape(-1, 2)
        state[key] = value
    return state


def from_state(state: dict):
    """The observer `to_state` described."""
    kind = _KINDS.get(state.get("kind"))
    if kind is None:
        raise ValueError(f"unknown observer kind {state.get('kind')!r}; kinds are {', '.join(_KINDS)}")
    observer = kind.__new__(kind)
    for key, value in state.items():
        if key == "kind":
            continue
        if isinstance(value, dict):
            value = from_state(value)
        elif key == "extremes":
            value = [tuple(map(float, row)) for row in np.asarray(value).reshape(-1, 2)]
        setattr(observer, key, value)
    return observer


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
