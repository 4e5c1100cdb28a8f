"""Combination kernels: pure functions that reduce a float32 block (N, h, w) along axis 0.

Every kernel returns ``(image, n_used)``: the combined float32 image (h, w) and the uint16
number of frames each pixel used. NaN marks a missing value (a BLANK pixel, an inf in a float
frame): it is ignored. No I/O, no Dask, no state: kernels are small frozen objects, validated
at construction, picklable and safe to share between threads.

Each fast kernel has a slow reference beside it (``*_reference``), written per pixel for
clarity; property tests prove they agree.

How the fast kernels work: `stacker._fast` compiles (numba, releasing the GIL) loops over
the pixels. Up to `NETWORK_MAX_FRAMES` frames they sort the values of 64 pixels at a time
with a sorting network (vector min/max, no branches), after which a median, a trimmed range
or a clipping iteration is a matter of indices; the MAD spread and larger stacks use O(N)
selections (quickselect) per pixel instead. A call holds nothing beyond the block and
buffers of 64 x N values, whatever N is.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import ClassVar, Literal, Protocol

import numpy as np

#: MAD -> standard deviation of a normal distribution: 1 / Phi^-1(3/4).
MAD_TO_STD = 1.482602218505602
#: Relative slack on the clipping bounds (see `SigmaClip`).
SLACK = 1e-6


class Kernel(Protocol):
    """What the engine needs from a kernel."""

    #: Bytes per input value the kernel holds while it runs, beyond the block itself.
    bytes_per_value: ClassVar[int]

    def __call__(self, block: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...


#: Up to this many frames the kernels sort tiles of pixels with a sorting network
#: (`stacker.sorting.network`), measured 2.3-3.7x faster than selections from N=5 to 1000;
#: beyond that its N log^2 N comparators are untested against the O(N) selections.
NETWORK_MAX_FRAMES = 1024


@functools.lru_cache(maxsize=16)
def _network(n: int) -> tuple[np.ndarray, np.ndarray]:
    from stacker.sorting import network

    return network(n)


def _prepared(block: np.ndarray):
    # uint16 blocks (camera data read as is, `StripReader.dtype`) stay integers: the same
    # values, half the bytes, and twice the pixels per vector instruction when sorting.
    dtype = np.uint16 if block.dtype == np.uint16 else np.float32
    block = np.ascontiguousarray(block, dtype=dtype)
    shape = block.shape[1:]
    return block, np.empty(shape, np.float32), np.empty(shape, np.uint16)


def _fill(block: np.ndarray):
    """What a missing value becomes in a sorted tile, and what pads it: +inf (sorts last);
    for integers, which have no missing values, their largest value."""
    if block.dtype.kind == "f":
        return block.dtype.type(np.inf)
    return block.dtype.type(np.iinfo(block.dtype).max)


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
    Cost: with the standard deviation, one sort per pixel by a sorting network
    (O(N log^2 N) vector comparisons shared by 64 pixels), then O(N) per iteration that
    rejects something; most pixels converge after the first iteration. With MAD, O(N) per
    pixel and iteration (quickselects).
    """

    sigma_low: float = 3.0
    sigma_high: float = 3.0
    center: Literal["median", "mean"] = "median"
    stddev: Literal["std", "mad_std"] = "std"
    max_iterations: int | None = None

    # Beyond the float32 block the engine reads, a call holds two buffers of N values.
    bytes_per_value: ClassVar[int] = 0

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
        from stacker import compiled

        block, image, used = _prepared(block)
        iterations = -1 if self.max_iterations is None else self.max_iterations
        if self.stddev == "std" and block.shape[0] <= NETWORK_MAX_FRAMES:
            compiled.sigma_clip_sorted(block, *_network(block.shape[0]), _fill(block),
                                       float(self.sigma_low),
                                       float(self.sigma_high), self.center == "mean", iterations,
                                       image, used)
            return image, used
        compiled.sigma_clip(block, float(self.sigma_low), float(self.sigma_high),
                            self.center == "mean", self.stddev == "mad_std", iterations, image,
                            used)
        return image, used


def _choice(name: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")


# --------------------------------------------------------------------------------------------
# min/max, median, mean


class RunningSums:
    """The streaming form of `Mean` and of `MinMax` dropping at most one value each way, for
    camera data: uint16 frame rows are added one frame at a time to exact int32 totals (and
    running extremes), so no (N, h, w) block is ever held; `result` equals the kernel's on
    the stacked rows, bit for bit.

    Parameters
    ----------
    shape : (h, w)
        Rows and columns of the strip.
    nlow, nhigh : int
        0 or 1: values dropped per pixel once more than ``nlow + nhigh`` frames were added.
    """

    #: Most frames whose uint16 sum an int32 total holds.
    MAX_FRAMES = 32767

    def __init__(self, shape: tuple[int, int], nlow: int = 0, nhigh: int = 0) -> None:
        self.nlow, self.nhigh, self.n = nlow, nhigh, 0
        self.total = np.zeros(shape, np.int32)
        self.vmin = np.full(shape, np.iinfo(np.uint16).max, np.uint16)
        self.vmax = np.zeros(shape, np.uint16)

    def add(self, rows: np.ndarray) -> None:
        """Add one frame's rows (uint16, the strip's shape)."""
        from stacker import compiled

        self.added(1)  # (first: it refuses the frame that would overflow the totals)
        compiled.add_rows(rows, self.total, self.vmin, self.vmax, self.extremes)

    @property
    def extremes(self) -> bool:
        """Whether the running extremes are kept (a value is dropped at either end)."""
        return self.nlow + self.nhigh > 0

    def added(self, count: int) -> None:
        """Count `count` frames' rows added to `total` (and the extremes): by `add`, or by
        a compiled loop that reads and adds them (`stacker.io.StripReader.add_frames`)."""
        if self.n + count > self.MAX_FRAMES:
            raise ValueError(f"more than {self.MAX_FRAMES} frames overflow the running sums")
        self.n += count

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """(image float32, n_used uint16) of the frames added so far (at least one)."""
        from stacker import compiled

        image = np.empty(self.total.shape, np.float32)
        used = np.empty(self.total.shape, np.uint16)
        compiled.finish_rows(self.total, self.vmin, self.vmax, self.n, self.nlow, self.nhigh,
                             image, used)
        return image, used


@dataclass(frozen=True)
class MinMax:
    """Drop the `nlow` lowest and `nhigh` highest values of each pixel, average the rest.

    A pixel with fewer than ``nlow + nhigh + 1`` finite values gets the plain mean of all of
    them (the seed: with 2 frames or fewer, the mean).
    """

    nlow: int = 1
    nhigh: int = 1

    bytes_per_value: ClassVar[int] = 0

    def __post_init__(self) -> None:
        for name in ("nlow", "nhigh"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {v!r}")

    def running(self, shape: tuple[int, int]) -> RunningSums | None:
        """Running sums for uint16 frames added one at a time (None: needs the block)."""
        if self.nlow <= 1 and self.nhigh <= 1:
            return RunningSums(shape, self.nlow, self.nhigh)
        return None

    def __call__(self, block: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Combine a (N, h, w) block; returns (image, n_used)."""
        from stacker import compiled

        block, image, used = _prepared(block)
        if self.nlow <= 1 and self.nhigh <= 1:
            # The usual case: one running total and the extremes per pixel, frame row by
            # frame row (vectorized); pixels with values beyond 1e7 are redone exactly.
            compiled.mean_rows(block, self.nlow, self.nhigh, image, used)
            if (used == 65535).any():
                compiled.minmax(block, self.nlow, self.nhigh, image, used)
            return image, used
        if block.shape[0] <= NETWORK_MAX_FRAMES:
            compiled.trimmed_sorted(block, *_network(block.shape[0]), _fill(block), self.nlow,
                                    self.nhigh, False, image, used)
        else:
            compiled.minmax(block, self.nlow, self.nhigh, image, used)
        return image, used


@dataclass(frozen=True)
class Median:
    """Per-pixel median of the finite values (mean of the two middle ones for even counts)."""

    bytes_per_value: ClassVar[int] = 0

    def __call__(self, block: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Combine a (N, h, w) block; returns (image, n_used)."""
        from stacker import compiled

        block, image, used = _prepared(block)
        if block.shape[0] <= NETWORK_MAX_FRAMES:
            compiled.trimmed_sorted(block, *_network(block.shape[0]), _fill(block), 0, 0, True,
                                    image, used)
        else:
            compiled.median(block, image, used)
        return image, used


@dataclass(frozen=True)
class Mean:
    """Per-pixel mean of the finite values, accumulated in float64."""

    bytes_per_value: ClassVar[int] = 0

    def running(self, shape: tuple[int, int]) -> RunningSums:
        """Running sums for uint16 frames added one at a time."""
        return RunningSums(shape)

    def __call__(self, block: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Combine a (N, h, w) block; returns (image, n_used)."""
        from stacker import compiled

        block, image, used = _prepared(block)
        compiled.mean_rows(block, 0, 0, image, used)
        return image, used


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
