"""Combination kernels: pure functions that reduce a float32 block (N, h, w) along axis 0.

Every kernel returns ``(image, n_used)``: the combined float32 image (h, w) and the uint16
number of frames each pixel used. NaN marks a missing value (a BLANK pixel, an inf in a float
frame): it is ignored. No I/O, no Dask, no state: kernels are small frozen objects, validated
at construction, picklable and safe to share between threads.

Each fast kernel has a slow reference beside it (``*_reference``), written per pixel for
clarity; property tests prove they agree.

How the fast kernels work: the block is transposed to (pixels, N) so that each pixel's values
are contiguous, and sorted once (NaN sorts last). For every rejection rule here the values a
pixel keeps are then a contiguous range ``[lo, hi)`` of its sorted values, so clipping is a
matter of moving two indices, and sums over the range come from prefix sums. Pixels are
processed in batches of about a million values, which bounds the working memory of a call to
the transposed copy plus a few tens of megabytes, whatever N is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal, Protocol

import numpy as np

#: MAD -> standard deviation of a normal distribution: 1 / Phi^-1(3/4).
MAD_TO_STD = 1.482602218505602
#: Relative slack on the clipping bounds (see `SigmaClip`).
SLACK = 1e-6
#: Values per processing batch inside a kernel call (bounds temporary memory).
BATCH_VALUES = 1 << 20


class Kernel(Protocol):
    """What the engine needs from a kernel."""

    #: Bytes per input value the kernel holds while it runs (its transposed sorted copy).
    bytes_per_value: ClassVar[int]
    #: Bytes per value of the temporaries of one batch (at most `BATCH_VALUES` values).
    batch_bytes_per_value: ClassVar[int]

    def __call__(self, block: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...


# --------------------------------------------------------------------------------------------
# shared machinery


def _sorted_pixels(block: np.ndarray) -> np.ndarray:
    """(N, h, w) -> (h*w, N) float32, each row sorted ascending with NaN last."""
    n = block.shape[0]
    x = np.array(block.reshape(n, -1).T, dtype=np.float32, order="C")
    x.sort(axis=1)
    return x


def _finite_count(x: np.ndarray) -> np.ndarray:
    return x.shape[1] - np.isnan(x).sum(axis=1)


def _batches(p: int, n: int):
    step = max(1, BATCH_VALUES // max(n, 1))
    for start in range(0, p, step):
        yield slice(start, min(start + step, p))


def _take(x: np.ndarray, idx: np.ndarray) -> np.ndarray:
    return np.take_along_axis(x, idx[:, None], axis=1)[:, 0].astype(np.float64)


def _range_median(x: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Median of the sorted values x[i, lo[i]:hi[i]] (mean of the two middle ones)."""
    m = hi - lo
    return 0.5 * (_take(x, lo + (m - 1) // 2) + _take(x, lo + m // 2))


class _PrefixSums:
    """Sums of (x - shift) and (x - shift)**2 over any [lo, hi) of each row, in float64."""

    def __init__(self, x: np.ndarray, shift: np.ndarray) -> None:
        d = x.astype(np.float64) - shift[:, None]
        d[np.isnan(d)] = 0.0  # NaNs sit after hi: they never enter a range, keep sums finite
        self.shift = shift
        self.s1 = np.zeros((x.shape[0], x.shape[1] + 1))
        self.s2 = np.zeros_like(self.s1)
        np.cumsum(d, axis=1, out=self.s1[:, 1:])
        np.cumsum(d * d, axis=1, out=self.s2[:, 1:])

    def mean_std(self, rows, lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        m = (hi - lo).astype(np.float64)
        s1 = _pair(self.s1, rows, hi) - _pair(self.s1, rows, lo)
        s2 = _pair(self.s2, rows, hi) - _pair(self.s2, rows, lo)
        mean = s1 / m
        var = np.maximum(s2 / m - mean * mean, 0.0)
        return mean + self.shift[rows], np.sqrt(var)


def _pair(a: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    return a[rows, cols]


def _result(shape, image: np.ndarray, used: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return image.reshape(shape).astype(np.float32), used.reshape(shape).astype(np.uint16)


# --------------------------------------------------------------------------------------------
# sigma clipping


@dataclass(frozen=True)
class SigmaClip:
    r"""Iterative sigma clipping, then the mean of what is kept.

    A value :math:`x` of the current set :math:`S` of a pixel is kept when

    .. math:: c - \sigma_{low}\,s\,(1 + 10^{-6}) \le x \le c + \sigma_{high}\,s\,(1 + 10^{-6})

    where :math:`c` is the centre of :math:`S` (median, or mean) and :math:`s` its spread
    (population standard deviation, or :math:`1.4826\,\mathrm{median}(|x - \mathrm{median}(S)|)`).
    :math:`S` starts as the pixel's finite values and is replaced by the kept subset until
    nothing more is rejected, or `max_iterations` have been applied. An iteration that would
    reject every remaining value is not applied. The result is the mean of :math:`S`, and
    ``n_used`` is :math:`|S|`; a pixel with no finite value gives NaN and 0.

    The relative slack of :math:`10^{-6}` decides algebraic ties the same way in every
    implementation: a single outlier among 10 values sits exactly at 3 standard deviations of a
    mean/std clip and is kept.

    Parameters
    ----------
    sigma_low, sigma_high : float
        Thresholds in units of the spread, > 0.
    center : {"median", "mean"}
        Centre estimator.
    stddev : {"std", "mad_std"}
        Spread estimator.
    max_iterations : int or None
        At most this many clipping iterations (>= 1); None iterates until converged.

    Notes
    -----
    The seed guide's single-pass clip is ``SigmaClip(center="mean", max_iterations=1)``.
    With N <= 10 frames a single outlier can never exceed 3 standard deviations of a mean/std
    clip; the median centre used by default does not have that blind spot.
    Cost: one sort of each pixel's N values, then O(N) per iteration for pixels still changing.
    """

    sigma_low: float = 3.0
    sigma_high: float = 3.0
    center: Literal["median", "mean"] = "median"
    stddev: Literal["std", "mad_std"] = "std"
    max_iterations: int | None = None

    # Measured with tracemalloc on (N=20 and 200, 40, 4096) blocks: peak = 4 B per value
    # (the sorted copy) + 35-44 B per value of the batch being clipped (float64 prefix sums).
    bytes_per_value: ClassVar[int] = 4
    batch_bytes_per_value: ClassVar[int] = 48

    def __post_init__(self) -> None:
        for name in ("sigma_low", "sigma_high"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
                raise ValueError(f"{name} must be a number > 0, got {value!r}")
        _choice("center", self.center, ("median", "mean"))
        _choice("stddev", self.stddev, ("std", "mad_std"))
        it = self.max_iterations
        if it is not None and (isinstance(it, bool) or not isinstance(it, int) or it < 1):
            raise ValueError(f"max_iterations must be an integer >= 1 or None, got {it!r}")

    def __call__(self, block: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Combine a (N, h, w) block; returns (image float32 (h, w), n_used uint16 (h, w))."""
        n = block.shape[0]
        x = _sorted_pixels(block)
        image = np.empty(x.shape[0], np.float64)
        used = np.empty(x.shape[0], np.int64)
        for rows in _batches(x.shape[0], n):
            image[rows], used[rows] = self._clip(x[rows])
        return _result(block.shape[1:], image, used)

    def _clip(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        p = x.shape[0]
        lo = np.zeros(p, np.int64)
        hi = _finite_count(x).astype(np.int64)
        has = hi > 0
        shift = np.zeros(p)
        shift[has] = _range_median(x[has], lo[has], hi[has])
        sums = _PrefixSums(x, shift)
        active = np.flatnonzero(has)
        iteration = 0
        while active.size and (self.max_iterations is None or iteration < self.max_iterations):
            iteration += 1
            a_lo, a_hi = lo[active], hi[active]
            xa = x[active]
            c, s = self._centre_spread(xa, sums, active, a_lo, a_hi)
            lower = c - self.sigma_low * s * (1 + SLACK)
            upper = c + self.sigma_high * s * (1 + SLACK)
            new_lo = np.maximum(a_lo, (xa < lower[:, None]).sum(axis=1))
            new_hi = np.minimum(a_hi, (xa <= upper[:, None]).sum(axis=1))
            moved = ((new_lo != a_lo) | (new_hi != a_hi)) & (new_hi > new_lo)
            lo[active[moved]], hi[active[moved]] = new_lo[moved], new_hi[moved]
            active = active[moved]
        mean = np.full(p, np.nan)
        rows = np.flatnonzero(has)
        mean[rows] = sums.mean_std(rows, lo[rows], hi[rows])[0]
        return mean, hi - lo

    def _centre_spread(self, xa, sums, rows, lo, hi):
        median = _range_median(xa, lo, hi) if (self.center == "median"
                                               or self.stddev == "mad_std") else None
        if self.stddev == "std" or self.center == "mean":
            mean, std = sums.mean_std(rows, lo, hi)
        centre = median if self.center == "median" else mean
        if self.stddev == "std":
            return centre, std
        return centre, MAD_TO_STD * _range_mad(xa, lo, hi, median)


def _range_mad(x: np.ndarray, lo: np.ndarray, hi: np.ndarray, median: np.ndarray) -> np.ndarray:
    """median(|x - median|) over each row's range [lo, hi)."""
    idx = np.arange(x.shape[1])
    inside = (idx >= lo[:, None]) & (idx < hi[:, None])
    dev = np.where(inside, np.abs(x.astype(np.float64) - median[:, None]), np.inf)
    dev.sort(axis=1)
    return _range_median(dev, np.zeros_like(lo), hi - lo)


def _choice(name: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")


# --------------------------------------------------------------------------------------------
# min/max, median, mean


@dataclass(frozen=True)
class MinMax:
    """Drop the `nlow` lowest and `nhigh` highest values of each pixel, average the rest.

    A pixel with fewer than ``nlow + nhigh + 1`` finite values gets the plain mean of all of
    them (the seed: with 2 frames or fewer, the mean).
    """

    nlow: int = 1
    nhigh: int = 1

    # Measured as SigmaClip's: 4 B per value + 8-10 B per batch value.
    bytes_per_value: ClassVar[int] = 4
    batch_bytes_per_value: ClassVar[int] = 12

    def __post_init__(self) -> None:
        for name in ("nlow", "nhigh"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {v!r}")

    def __call__(self, block: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Combine a (N, h, w) block; returns (image, n_used)."""
        n = block.shape[0]
        x = _sorted_pixels(block)
        image = np.empty(x.shape[0], np.float64)
        used = np.empty(x.shape[0], np.int64)
        for rows in _batches(x.shape[0], n):
            xb = x[rows]
            m = _finite_count(xb)
            trim = m > self.nlow + self.nhigh
            lo = np.where(trim, self.nlow, 0)
            hi = np.where(trim, m - self.nhigh, m)
            image[rows] = _range_mean(xb, lo, hi)
            used[rows] = hi - lo
        return _result(block.shape[1:], image, used)


def _range_mean(x: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    idx = np.arange(x.shape[1])
    inside = (idx >= lo[:, None]) & (idx < hi[:, None])
    total = np.where(inside, x, 0).sum(axis=1, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(hi > lo, total / (hi - lo), np.nan)


@dataclass(frozen=True)
class Median:
    """Per-pixel median of the finite values (mean of the two middle ones for even counts)."""

    bytes_per_value: ClassVar[int] = 4
    batch_bytes_per_value: ClassVar[int] = 12

    def __call__(self, block: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Combine a (N, h, w) block; returns (image, n_used)."""
        x = _sorted_pixels(block)
        image = np.full(x.shape[0], np.nan)
        used = np.empty(x.shape[0], np.int64)
        for rows in _batches(x.shape[0], block.shape[0]):
            xb = x[rows]
            m = _finite_count(xb)
            has = m > 0
            part = np.full(xb.shape[0], np.nan)
            part[has] = _range_median(xb[has], np.zeros(int(has.sum()), np.int64), m[has])
            image[rows], used[rows] = part, m
        return _result(block.shape[1:], image, used)


@dataclass(frozen=True)
class Mean:
    """Per-pixel mean of the finite values, accumulated in float64."""

    # The NaN mask (1 B) and, only when there are NaNs, a zero-filled copy (4 B).
    bytes_per_value: ClassVar[int] = 5
    batch_bytes_per_value: ClassVar[int] = 0

    def __call__(self, block: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Combine a (N, h, w) block; returns (image, n_used)."""
        missing = np.isnan(block)
        if missing.any():
            used = block.shape[0] - missing.sum(axis=0)
            total = np.where(missing, 0, block).sum(axis=0, dtype=np.float64)
        else:
            used = np.full(block.shape[1:], block.shape[0])
            total = block.sum(axis=0, dtype=np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            image = np.where(used > 0, total / used, np.nan)
        return image.astype(np.float32), used.astype(np.uint16)


KERNELS = {"sigma_clip": SigmaClip, "minmax": MinMax, "median": Median, "mean": Mean}


def make_kernel(method: str, **options) -> Kernel:
    """The kernel for a rejection method with its options (see `Settings.kernel_options`)."""
    if method not in KERNELS:
        raise ValueError(f"unknown method {method!r}; use one of {', '.join(KERNELS)}")
    return KERNELS[method](**options)


# --------------------------------------------------------------------------------------------
# reference implementations: slow, per pixel, obvious


def _pixels(block: np.ndarray):
    _, h, w = block.shape
    for i in range(h):
        for j in range(w):
            values = block[:, i, j].astype(np.float64)
            yield i, j, values[np.isfinite(values)]


def _ref_output(block):
    shape = block.shape[1:]
    return np.full(shape, np.nan), np.zeros(shape, np.int64)


def sigma_clip_reference(block: np.ndarray, sigma_low: float = 3.0, sigma_high: float = 3.0,
                         center: str = "median", stddev: str = "std",
                         max_iterations: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """`SigmaClip`, one pixel at a time, straight from its docstring."""
    image, used = _ref_output(block)
    for i, j, s in _pixels(block):
        if s.size == 0:
            continue
        iteration = 0
        while max_iterations is None or iteration < max_iterations:
            iteration += 1
            c = np.median(s) if center == "median" else np.mean(s)
            if stddev == "std":
                spread = np.std(s)
            else:
                spread = MAD_TO_STD * np.median(np.abs(s - np.median(s)))
            keep = s[(s >= c - sigma_low * spread * (1 + SLACK))
                     & (s <= c + sigma_high * spread * (1 + SLACK))]
            if keep.size == 0 or keep.size == s.size:
                break
            s = keep
        image[i, j], used[i, j] = np.mean(s), s.size
    return image.astype(np.float32), used.astype(np.uint16)


def minmax_reference(block: np.ndarray, nlow: int = 1, nhigh: int = 1):
    """`MinMax`, one pixel at a time."""
    image, used = _ref_output(block)
    for i, j, s in _pixels(block):
        if s.size == 0:
            continue
        s = np.sort(s)
        if s.size > nlow + nhigh:
            s = s[nlow: s.size - nhigh]
        image[i, j], used[i, j] = np.mean(s), s.size
    return image.astype(np.float32), used.astype(np.uint16)


def median_reference(block: np.ndarray):
    """`Median`, one pixel at a time."""
    image, used = _ref_output(block)
    for i, j, s in _pixels(block):
        if s.size:
            image[i, j], used[i, j] = np.median(s), s.size
    return image.astype(np.float32), used.astype(np.uint16)


def mean_reference(block: np.ndarray):
    """`Mean`, one pixel at a time."""
    image, used = _ref_output(block)
    for i, j, s in _pixels(block):
        if s.size:
            image[i, j], used[i, j] = np.mean(s), s.size
    return image.astype(np.float32), used.astype(np.uint16)
