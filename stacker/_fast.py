"""Compiled per-pixel loops behind `stacker.kernels` (numba, ``nogil``: Dask threads run them
in parallel).

Two families, with the rules documented on the kernel classes; the slow references in
`stacker.kernels` are the oracle both are tested against:

- sorted tiles (`sigma_clip_sorted`, `trimmed_sorted`): a sorting network orders the N values
  of 64 neighbouring pixels at once with vector min/max instructions, after which the
  median, the trimmed range and every sigma-clip iteration are index arithmetic. The default
  for N <= `stacker.kernels.NETWORK_MAX_FRAMES`;
- per-pixel selections (`sigma_clip`, `minmax`, `median`): each pixel's finite values are
  gathered into a small buffer and worked on with O(N) quickselects. Used for the MAD
  spread and beyond the network's range.
"""

from __future__ import annotations

import sys
import threading

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic, overload

from stacker._registers import merge_group, sort_group
from stacker.sorting import GROUP, network, network_rows

MAD_TO_STD = 1.482602218505602
SLACK = 1e-6
#: A clip iteration updates its sum of squares by subtracting the rejected values' part,
#: unless that part is this many times what remains: the difference's relative error, up
#: to N x 2^-53 x the ratio (< 1e-8 at N=1024), stays far below SLACK, which then decides.
#: With integer data every term is a multiple of 1/4 and the update is exact.
CANCELLATION = 1e4


@njit(nogil=True, cache=True)
def _median3(a, i, j, k):  # pragma: no cover - compiled
    """The index among i, j, k of the median of a[i], a[j], a[k]."""
    x, y, z = a[i], a[j], a[k]
    if (x <= y <= z) or (z <= y <= x):
        return j
    if (y <= x <= z) or (z <= x <= y):
        return i
    return k


@njit(nogil=True, cache=True)
def _select(a, lo, hi, k):  # pragma: no cover - compiled
    """Partially order a[lo:hi] so that a[k] is the value of rank k; returns it.

    Values equal to the pivot are gathered next to it before going right: with only the
    strict partition, a run of equal values loses one element per pass, and integer camera
    data or a constant frame took quadratic time (262 144 equal values: 25 s instead of
    under a millisecond).
    """
    while hi - lo > 1:
        mid = (lo + hi - 1) // 2
        # The pivot, moved to the end: the median of three values, or beyond 32 the median
        # of three such medians (Tukey's ninther). Three values are a poor guess of the
        # middle of structured data: a flat's sampled rows (a smooth curve each) took twice
        # as long as the same values shuffled, and the deviations of a pixel from its
        # median in frames that drift steadily form a V, the worst case of a median of
        # three (mad_std clipping of 300 such frames: 40 us a pixel instead of 4).
        if hi - lo > 32:
            step = (hi - lo) // 8
            p = _median3(a, _median3(a, lo, lo + step, lo + 2 * step),
                         _median3(a, mid - step, mid, mid + step),
                         _median3(a, hi - 1 - 2 * step, hi - 1 - step, hi - 1))
        else:
            p = _median3(a, lo, mid, hi - 1)
        pivot = a[p]
        a[p], a[hi - 1] = a[hi - 1], a[p]
        # Branch-free Lomuto partition: on random data a branch per element mispredicts half
        # the time, which costs more than the unconditional swap.
        store = lo
        for i in range(lo, hi - 1):
            v = a[i]
            a[i] = a[store]
            a[store] = v
            store += v < pivot
        a[store], a[hi - 1] = a[hi - 1], a[store]
        if k < store:
            hi = store
            continue
        # a[store + 1:hi] >= pivot. When that is most of the range, which is what a run of
        # equal values gives, move the ones equal to the pivot to its front; on distinct
        # values the pass would be wasted (~20% slower per-pixel medians).
        equal = store + 1
        if k >= equal and 4 * (hi - equal) > 3 * (hi - lo):
            for i in range(store + 1, hi):
                v = a[i]
                a[i] = a[equal]
                a[equal] = v
                equal += v == pivot
        if k < equal:
            return a[k]
        lo = equal
    return a[k]


@njit(nogil=True, cache=True)
def _middle_pair(work, m):  # pragma: no cover - compiled
    """The values of ranks (m-1)//2 and m//2 of work[:m] (the same one for odd m);
    reorders work[:m]."""
    k = (m - 1) // 2
    a = _select(work, 0, m, k)
    if m % 2 == 1:
        return a, a
    b = work[k + 1]
    for i in range(k + 2, m):  # the smallest value above rank k is the next order statistic
        if work[i] < b:
            b = work[i]
    return a, b


@njit(nogil=True, cache=True)
def _median(values, m, work):  # pragma: no cover - compiled
    """Median of values[:m] (mean of the two middle ones when m is even); uses `work`."""
    for i in range(m):
        work[i] = values[i]
    a, b = _middle_pair(work, m)
    if m % 2 == 1:
        return np.float64(a)
    return 0.5 * (np.float64(a) + np.float64(b))


@njit(nogil=True, cache=True)
def median_in_place(work):  # pragma: no cover - compiled
    """``np.median`` of the finite float32 values `work` (1-D, at least one; reordered):
    the value of rank (m-1)//2, or for even m its float32 sum with the next one, halved,
    which is how numpy averages the two (its float32 mean of two values). One quickselect
    and a scan, 2-3x faster than numpy's two-rank partition."""
    m = work.size
    a, b = _middle_pair(work, m)
    if m % 2 == 1:
        return a
    return (a + b) * np.float32(0.5)


@njit(nogil=True, cache=True)
def count_values(values, hist):  # pragma: no cover - compiled
    """``hist[v] += 1`` for each of `values`; False (`hist` incomplete) at the first one
    that is not an integer from 0 to hist.size - 1."""
    size = hist.size
    for v in values:
        i = np.int64(v)
        if i != v or i < 0 or i >= size:
            return False
        hist[i] += 1
    return True


@njit(nogil=True, cache=True, inline="always")
def _ranked(count, value, seen, first, k1, k2):  # pragma: no cover - compiled
    """One step of a walk over counted values in increasing order: `count` of them equal to
    `value` after `seen` smaller ones. Returns (value of rank k1 or the `first` known,
    value of rank k2 or -1 while not reached, values seen)."""
    if first < 0 and seen + count > k1:
        first = value
    if seen + count > k2:
        return first, value, seen + count
    return first, -1, seen + count


@njit(nogil=True, cache=True)
def counted_medians(hist, m):  # pragma: no cover - compiled
    """(median, median absolute deviation from it) of the m integers counted in `hist`,
    float32, bit for bit what `median_in_place` and `deviation_median` give on them: two
    walks over the counts instead of two quickselects over the values (a dark frame's
    262 144 sampled pixels: ~0.3 instead of ~1.9 ms)."""
    k1 = (m - 1) // 2
    k2 = m // 2
    a = -1
    b = -1
    seen = 0
    v = 0
    while b < 0:
        a, b, seen = _ranked(hist[v], v, seen, a, k1, k2)
        v += 1
    median = np.float32(a) if m % 2 == 1 else (np.float32(a) + np.float32(b)) * np.float32(0.5)
    # Deviations from the median, in halves (the median of integers is one, or a half):
    # walking outwards from it meets them in increasing order.
    twice = np.int64(2 * median)
    lo = twice // 2
    hi = lo + 1
    big = np.int64(1) << 40
    da = -1
    db = -1
    seen = 0
    while db < 0:
        dl = twice - 2 * lo if lo >= 0 else big
        dh = 2 * hi - twice if hi < hist.size else big
        if dl <= dh:
            da, db, seen = _ranked(hist[lo], dl, seen, da, k1, k2)
            lo -= 1
        else:
            da, db, seen = _ranked(hist[hi], dh, seen, da, k1, k2)
            hi += 1
    half = np.float32(0.5)
    if m % 2 == 1:
        return median, np.float32(da) * half
    return median, (np.float32(da) * half + np.float32(db) * half) * half


@njit(nogil=True, cache=True)
def window_moments(values, centre, halfwidth):  # pragma: no cover - compiled
    """(count, mean, std) of the values v with ``abs(v - centre) <= halfwidth``, the test
    made in the values' own type, as numpy's ``values[np.abs(values - centre) <= h]``
    with `centre` and `halfwidth` of that type; the moments in float64, about `centre`.
    One pass instead of numpy's difference, absolute value, mask, copy, mean and std."""
    n = 0
    s1 = 0.0
    s2 = 0.0
    for v in values:
        if abs(v - centre) <= halfwidth:
            d = np.float64(v) - np.float64(centre)
            n += 1
            s1 += d
            s2 += d * d
    if n == 0:
        return 0, np.nan, np.nan
    m = s1 / n
    return n, np.float64(centre) + m, np.sqrt(max(s2 / n - m * m, 0.0))


@njit(nogil=True, cache=True)
def deviation_median(values, centre, work):  # pragma: no cover - compiled
    """``np.median(np.abs(values - centre))`` of finite float32 `values` (`centre` float32),
    through `work` (as long as `values`) by `median_in_place`: no temporaries."""
    for i in range(values.size):
        work[i] = abs(values[i] - centre)
    return median_in_place(work)


@njit(nogil=True, cache=True)
def sample_pass(values, raw, top, finite, work, raw_work):  # pragma: no cover - compiled
    """One pass over a frame's sample (1-D float32 `values`, and `raw` before subtraction):
    its finite values copied, in order, into `finite` and `work` (for a selection that
    reorders it), the raw values at the same places into `raw_work` (when it is not empty),
    and ``(count, mean, std, min, max, raw values >= top)``; mean and population std in
    float64 from sums shifted by the first finite value (no cancellation at a flat's
    level)."""
    keep_raw = raw_work.size > 0
    n = 0
    shift = 0.0
    s1 = 0.0
    s2 = 0.0
    lo = np.inf
    hi = -np.inf
    saturated = 0
    for i in range(values.size):
        if raw[i] >= top:
            saturated += 1
        x = values[i]
        if np.isfinite(x):
            if n == 0:
                shift = np.float64(x)
            finite[n] = x
            work[n] = x
            if keep_raw:
                raw_work[n] = raw[i]
            n += 1
            d = np.float64(x) - shift
            s1 += d
            s2 += d * d
            if x < lo:
                lo = x
            if x > hi:
                hi = x
    if n == 0:
        return 0, np.nan, np.nan, np.nan, np.nan, saturated
    mean = s1 / n
    return n, shift + mean, np.sqrt(max(s2 / n - mean * mean, 0.0)), lo, hi, saturated


#: Whole-number values a bracketed median may count instead of selecting (`_integer_median`).
HIST_BINS = 64

#: Bytes of one tile (pixels x frames), so that it stays in cache while it is transposed
#: and read back: 16-64 pixels, fewer as frames grow (32 KiB measured best at N=50 and 200).
TILE_BYTES = 32768


@njit(nogil=True, cache=True)
def _tile_width(n):  # pragma: no cover - compiled
    return max(16, min(64, TILE_BYTES // (4 * max(n, 1))))


@njit(nogil=True, cache=True)
def _load_tile(block, y, x0, x1, tile):  # pragma: no cover - compiled
    """tile[j, :] = the N values of pixel (y, x0 + j): contiguous reads of every frame's row.

    Reading one pixel's N values directly would touch N cache lines a whole frame apart,
    which alias in the cache; a tile reads each frame's row segment once. Eight frames go
    together, so that each tile row receives 32 consecutive bytes per pass instead of one
    value (2.5x faster than a frame at a time, measured at N=50 and 200).
    """
    n = block.shape[0]
    m = x1 - x0
    i = 0
    while i + 8 <= n:
        r0 = block[i, y, x0:x1]
        r1 = block[i + 1, y, x0:x1]
        r2 = block[i + 2, y, x0:x1]
        r3 = block[i + 3, y, x0:x1]
        r4 = block[i + 4, y, x0:x1]
        r5 = block[i + 5, y, x0:x1]
        r6 = block[i + 6, y, x0:x1]
        r7 = block[i + 7, y, x0:x1]
        for j in range(m):
            t = tile[j]
            t[i] = r0[j]
            t[i + 1] = r1[j]
            t[i + 2] = r2[j]
            t[i + 3] = r3[j]
            t[i + 4] = r4[j]
            t[i + 5] = r5[j]
            t[i + 6] = r6[j]
            t[i + 7] = r7[j]
        i += 8
    while i < n:
        r = block[i, y, x0:x1]
        for j in range(m):
            tile[j, i] = r[j]
        i += 1


@njit(nogil=True, cache=True)
def _gather(tile, j, buf):  # pragma: no cover - compiled
    m = 0
    for i in range(tile.shape[1]):
        v = tile[j, i]
        if v == v:  # NaN is missing
            buf[m] = v
            m += 1
    return m


@njit(nogil=True, cache=True)
def sigma_clip(block, sigma_low, sigma_high, center_mean, mad, max_iterations,
               image, used):  # pragma: no cover - compiled
    """Iterative sigma clipping of every pixel (see `stacker.kernels.SigmaClip`)."""
    n, h, w = block.shape
    buf = np.empty(n, np.float32)
    work = np.empty(n + HIST_BINS, np.float32)  # the tail is `_bracket_median`'s histogram
    deviations = np.empty(n, np.float64)
    width = _tile_width(n)
    tile = np.empty((width, n), np.float32)
    for y in range(h):
        for x0 in range(0, w, width):
            x1 = min(x0 + width, w)
            _load_tile(block, y, x0, x1, tile)
            for x in range(x0, x1):
                image[y, x], used[y, x] = _clip(tile, x - x0, buf, work, deviations,
                                                sigma_low, sigma_high, center_mean, mad,
                                                max_iterations)


@njit(nogil=True, cache=True)
def _mean(buf, lo, hi):  # pragma: no cover - compiled
    if hi <= lo:
        return np.nan
    total = 0.0
    for i in range(lo, hi):
        total += buf[i]
    return total / (hi - lo)


@njit(nogil=True, cache=True)
def _bracket_median(src, m, centre, sd, work):  # pragma: no cover - compiled
    """Median of the m finite values of `src`, usually in one pass.

    The median lies within a few standard errors (1.25 sd / sqrt(m)) of the mean for
    well-behaved data: one branch-free pass counts the values below a bracket around the
    mean and collects those inside it; when the middle ranks fall inside the bracket only
    those few values need a selection. Otherwise (outliers moved the mean) a quickselect
    over all values decides.
    """
    k1 = (m - 1) // 2
    k2 = m // 2
    half = 2.0 * 1.2533 * sd / np.sqrt(m)  # 2 standard errors: measured fastest of 1.5-3
    p1 = centre - half
    p2 = centre + half
    low = 0
    c = 0
    for i in range(src.size):
        v = src[i]
        if v == v:
            low += v < p1
            work[c] = v
            c += (v >= p1) & (v <= p2)
    if half > 0 and low <= k1 and k2 < low + c:
        if work.size >= src.size + HIST_BINS:
            found, med = _integer_median(work, c, p1, p2, k1 - low, k2 - low)
            if found:
                return med
        a = _select(work, 0, c, k1 - low)
        if k1 == k2:
            return np.float64(a)
        b = work[k1 - low + 1]
        for i in range(k1 - low + 2, c):
            b = min(b, work[i])
        return 0.5 * (np.float64(a) + np.float64(b))
    c = 0
    for i in range(src.size):
        v = src[i]
        if v == v:
            work[c] = v
            c += 1
    return _median(work, c, work)


@njit(nogil=True, cache=True)
def _integer_median(work, c, p1, p2, r1, r2):  # pragma: no cover - compiled
    """Ranks r1 and r2 of the c values in work[:c], when they are whole numbers in [p1, p2].

    Camera data are whole ADU, and the bracket around the mean spans only a few of them:
    counting each integer (in the tail of `work`) finds the middle ranks without the
    branch mispredictions of a selection (about 150 ns a pixel at N=50). Returns
    (False, 0.0) when a value is not whole or the span is too wide; the caller selects.
    """
    base = np.floor(p1)
    span = int(np.floor(p2) - base) + 1
    if span > HIST_BINS:
        return False, 0.0
    hist = work[work.size - HIST_BINS:]
    for t in range(span):
        hist[t] = 0.0
    for i in range(c):
        v = work[i]
        t = int(v - base)
        if np.float64(t) + base != v:
            return False, 0.0
        hist[t] += 1.0
    cum = 0.0
    a = 0.0
    have_a = False  # not a sentinel value of a: values below zero are whole numbers too
    for t in range(span):
        cum += hist[t]
        if not have_a and cum > r1:
            a = base + t
            have_a = True
        if cum > r2:
            return True, 0.5 * (a + (base + t))
    return False, 0.0


@njit(nogil=True, cache=True)
def _clip(tile, j, buf, work, deviations, sigma_low, sigma_high, center_mean, mad,
          max_iterations):  # pragma: no cover - compiled
    """Clip one pixel's values until converged; returns (mean of the kept values, count).

    One pass over the pixel's tile row sums the values and their squares (shifted by the
    first value, so the variance has no cancellation) and finds their extremes; the median
    comes from `_bracket_median`. When the extremes lie within the bounds, which is the
    common case, nothing more is done. Only a pixel that loses values is copied out and
    compacted, and that pass measures the survivors for the next round.
    """
    src = tile[j]
    m = 0
    shift = 0.0
    s1 = 0.0
    s2 = 0.0
    vmin = np.inf
    vmax = -np.inf
    for i in range(src.size):
        v = src[i]
        if v == v:  # NaN is missing
            if m == 0:
                shift = np.float64(v)
            m += 1
            d = np.float64(v) - shift
            s1 += d
            s2 += d * d
            vmin = min(vmin, v)
            vmax = max(vmax, v)
    if m == 0:
        return np.nan, 0
    values = src  # the tile row until something is rejected, then buf[:m]
    iteration = 0
    while max_iterations < 0 or iteration < max_iterations:
        iteration += 1
        mean = shift + s1 / m
        std = np.sqrt(max(s2 / m - (s1 / m) ** 2, 0.0))
        median = mean
        if not center_mean or mad:
            median = _bracket_median(values, m, mean, std, work)
        centre = mean if center_mean else median
        spread = std
        if mad:
            # float64 deviations: in float32 the deviations of tiny (subnormal) values from
            # a median between them round to zero, and so would the spread
            c = 0
            for i in range(values.size):
                v = values[i]
                if v == v:
                    deviations[c] = abs(np.float64(v) - median)
                    c += 1
            spread = MAD_TO_STD * _median(deviations, m, deviations)
        lower = centre - sigma_low * spread * (1 + SLACK)
        upper = centre + sigma_high * spread * (1 + SLACK)
        if vmin >= lower and vmax <= upper:
            break  # converged: nothing to reject
        keep = 0
        total = 0.0
        tmin = np.inf
        tmax = -np.inf
        for i in range(values.size):
            v = values[i]
            if lower <= v <= upper:  # False for NaN
                buf[keep] = v
                keep += 1
                total += v
                tmin = min(tmin, v)
                tmax = max(tmax, v)
        if keep == 0:  # it would reject everything: keep S (values is untouched)
            break
        # Survivors are measured about their own mean (two passes, as numpy's std does): the
        # old shift may be a rejected outlier, far from values that differ by very little.
        shift = total / keep
        s1 = 0.0
        s2 = 0.0
        for i in range(keep):
            d = np.float64(buf[i]) - shift
            s1 += d
            s2 += d * d
        m, vmin, vmax = keep, tmin, tmax
        values = buf[:m]
    return shift + s1 / m, m


@njit(nogil=True, cache=True)
def minmax(block, nlow, nhigh, image, used):  # pragma: no cover - compiled
    """Drop the nlow lowest and nhigh highest values of every pixel, average the rest."""
    n, h, w = block.shape
    buf = np.empty(n, np.float32)
    width = _tile_width(n)
    tile = np.empty((width, n), np.float32)
    for y in range(h):
        for x0 in range(0, w, width):
            x1 = min(x0 + width, w)
            _load_tile(block, y, x0, x1, tile)
            for x in range(x0, x1):
                m = _gather(tile, x - x0, buf)
                lo, hi = 0, m
                if m > nlow + nhigh:
                    _extremes(buf, m, nlow, nhigh)
                    lo, hi = nlow, m - nhigh
                image[y, x] = _mean(buf, lo, hi)
                used[y, x] = hi - lo


@njit(nogil=True, cache=True)
def _extremes(buf, m, nlow, nhigh):  # pragma: no cover - compiled
    """Move the nlow smallest values to the front and the nhigh largest to the end.

    A few passes of min/max extraction beat a selection for the usual 1-3 dropped values.
    """
    if nlow + nhigh > 6:
        if nlow > 0:
            _select(buf, 0, m, nlow - 1)
        if nhigh > 0:
            _select(buf, nlow, m, m - nhigh)
        return
    for k in range(nlow):
        best = k
        for i in range(k + 1, m):
            if buf[i] < buf[best]:
                best = i
        buf[k], buf[best] = buf[best], buf[k]
    for k in range(nhigh):
        end = m - 1 - k
        best = nlow
        for i in range(nlow + 1, end + 1):
            if buf[i] > buf[best]:
                best = i
        buf[end], buf[best] = buf[best], buf[end]


@njit(nogil=True, cache=True)
def median(block, image, used):  # pragma: no cover - compiled
    """Median of every pixel's finite values."""
    n, h, w = block.shape
    buf = np.empty(n, np.float32)
    work = np.empty(n, np.float32)
    width = _tile_width(n)
    tile = np.empty((width, n), np.float32)
    for y in range(h):
        for x0 in range(0, w, width):
            x1 = min(x0 + width, w)
            _load_tile(block, y, x0, x1, tile)
            for x in range(x0, x1):
                m = _gather(tile, x - x0, buf)
                image[y, x] = _median(buf, m, work) if m > 0 else np.nan
                used[y, x] = m


@njit(nogil=True, cache=True)
def uint16_from_fits(raw, out):  # pragma: no cover - compiled
    """Big-endian int16 + BZERO 32768 (FITS uint16) bytes -> float32 or uint16, in one pass.

    `raw` is the bytes viewed as native uint16: swapping the bytes and flipping the sign bit
    gives the unsigned value exactly.
    """
    flat_in = raw.ravel()
    flat_out = out.reshape(flat_in.size)
    for i in range(flat_in.size):
        v = flat_in[i]
        flat_out[i] = ((v >> 8) | (v << 8)) & 0xFFFF ^ 0x8000


@njit(nogil=True, cache=True)
def uint16_calibrated(raw, master, subtract, scale, out):  # pragma: no cover - compiled
    """FITS uint16 bytes (as `uint16_from_fits`) -> float32 ``(v - master) * scale``.

    The same float32 operations, in the same order, as converting, then ``out -= master``
    (when `subtract`) and ``out *= scale`` with numpy, in one pass while the rows are in
    cache. `scale` is a float32 (1 when there is none: multiplying by 1 changes nothing).
    """
    h, w = out.shape
    for y in range(h):
        for x in range(w):
            v = raw[y, x]
            f = np.float32(((v >> 8) | (v << 8)) & 0xFFFF ^ 0x8000)
            if subtract:
                f = f - master[y, x]
            out[y, x] = f * scale


@intrinsic
def _pread(typingctx, fd, address, nbytes, offset):
    """``pread(fd, address, nbytes, offset)`` of the C library, from compiled code: bytes
    read, -1 on an error. Declared by name, so the cached machine code links against the
    process's own C library when it is loaded (no address is baked into the cache)."""
    sig = types.int64(types.int32, types.uintp, types.int64, types.int64)

    def codegen(context, builder, signature, args):
        i64 = ir.IntType(64)
        byte_ptr = ir.IntType(8).as_pointer()
        fnty = ir.FunctionType(i64, [ir.IntType(32), byte_ptr, i64, i64])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "pread")
        fd_, address_, nbytes_, offset_ = args
        return builder.call(fn, [fd_, builder.inttoptr(address_, byte_ptr), nbytes_, offset_])

    return sig, codegen


@njit(nogil=True, cache=True)
def _read_rows(fd, offset, rows):  # pragma: no cover - compiled
    """Read `rows` (uint16, C-contiguous) whole from `fd` at `offset`: False when the read
    failed or came short."""
    nbytes = rows.size * 2
    return _pread(fd, rows.ctypes.data, nbytes, offset) == nbytes


@njit(nogil=True, cache=True)
def read_fits_uint16(fds, offsets, row_bytes, y0, step, out):  # pragma: no cover - compiled
    """Rows ``[y0, y0 + h)`` of every frame's FITS uint16 data into `out` (N, h, w), read
    straight into place with ``pread`` and converted there (as `uint16_from_fits`) in pieces
    of `step` rows while they are in cache. `fds` are the frames' open files, `offsets`
    where their data start.

    Returns -1, or the first frame whose read failed or came short: the caller reads it
    again the per-frame way, whose error names the file.
    """
    n, h, _ = out.shape
    for i in range(n):
        for c in range(0, h, step):
            piece = out[i, c:min(c + step, h)]
            if not _read_rows(fds[i], offsets[i] + (y0 + c) * row_bytes, piece):
                return i
            _from_fits_in_place(piece)
    return -1


@njit(nogil=True, cache=True)
def read_fits_sums(fds, offsets, row_bytes, y0, step, staging, total, vmin, vmax,
                   extremes):  # pragma: no cover - compiled
    """As `read_fits_uint16`, but each piece of `step` rows is read into `staging` (uint16,
    at least ``step * w`` values), converted there and added to the running sums of the
    strip's rows (`add_rows`: int32 `total` (h, w), and the extremes when `extremes`)
    while it is in cache. Returns -1, or the first frame whose read failed (the frames
    before it are added: the caller starts again from fresh sums)."""
    h, w = total.shape
    for i in range(fds.size):
        for c in range(0, h, step):
            d = min(c + step, h)
            raw = staging[:(d - c) * w].reshape((d - c, w))
            if not _read_rows(fds[i], offsets[i] + (y0 + c) * row_bytes, raw):
                return i
            _from_fits_in_place(raw)
            add_rows(raw, total[c:d], vmin[c:d], vmax[c:d], extremes)
    return -1


@njit(nogil=True, cache=True)
def _from_fits_in_place(rows):  # pragma: no cover - compiled
    """`uint16_from_fits` of (h, w) rows onto themselves. Its own loop: given one array as
    both input and output, `uint16_from_fits`' vector loop finds them overlapping at run
    time and takes its scalar path (0.35 against 0.31 s for reading 50 frames' strips)."""
    h, w = rows.shape
    for y in range(h):
        r = rows[y]
        for x in range(w):
            v = r[x]
            r[x] = ((v >> 8) | (v << 8)) & 0xFFFF ^ 0x8000


@njit(nogil=True, cache=True)
def read_fits_calibrated(fds, offsets, row_bytes, y0, step, staging, master, subtract,
                         scales, out):  # pragma: no cover - compiled
    """As `read_fits_uint16`, into float32 `out` as ``(value - master) * scales[i]`` (when
    `subtract`; else ``value * scales[i]``), by `uint16_calibrated`: each piece of `step`
    rows is read into `staging` (uint16, at least ``step * w`` values) and converted from
    there. `master` is (h, w) float32 (any such array when not `subtract`)."""
    n, h, w = out.shape
    for i in range(n):
        for c in range(0, h, step):
            d = min(c + step, h)
            raw = staging[:(d - c) * w].reshape((d - c, w))
            if not _read_rows(fds[i], offsets[i] + (y0 + c) * row_bytes, raw):
                return i
            uint16_calibrated(raw, master[c:d], subtract, scales[i], out[i, c:d])
    return -1


@njit(nogil=True, cache=True)
def count_above(block, local, floor, margin, counts):  # pragma: no cover - compiled
    """For each pixel ``local[j]`` (flat index within a strip of `block`, (N, h, w)), add
    to ``counts[j]`` the frames where its value exceeds ``floor[j]`` by more than
    ``margin[j]`` (NaN never does)."""
    n = block.shape[0]
    flat = block.reshape((n, block.shape[1] * block.shape[2]))
    for i in range(n):
        row = flat[i]
        for j in range(local.size):
            if np.float64(row[local[j]]) - floor[j] > margin[j]:
                counts[j] += 1


@njit(nogil=True, cache=True)
def mean_rows(block, nlow, nhigh, image, used):  # pragma: no cover - compiled
    """Mean of every pixel, dropping at most one lowest and one highest value (nlow, nhigh
    in {0, 1}), accumulated frame row by frame row so that the loops vectorize.

    Subtracting the extremes from the float64 total is exact to far below float32
    resolution while the values stay below 1e7 in magnitude; a pixel beyond that (never
    camera data) is marked used = 65535 for the caller to redo with the exact loop.
    """
    n, h, w = block.shape
    # Accumulators for MEAN_SPAN pixels stay in the L1 cache while all frames pass (a whole
    # 4096-px row of them did not: 0.55 -> 0.48 s for 50 x 4096x4096 on one thread).
    total = np.empty(MEAN_SPAN, np.float64)
    count = np.empty(MEAN_SPAN, np.int32)
    vmin = np.empty(MEAN_SPAN, np.float32)
    vmax = np.empty(MEAN_SPAN, np.float32)
    extremes = nlow + nhigh > 0
    for y in range(h):
        for x0 in range(0, w, MEAN_SPAN):
            m = min(MEAN_SPAN, w - x0)
            total[:] = 0.0
            count[:] = 0
            vmin[:] = np.inf
            vmax[:] = -np.inf
            for i in range(n):
                row = block[i, y, x0:x0 + m]
                if extremes:
                    for x in range(m):
                        v = row[x]
                        ok = v == v
                        total[x] += v if ok else 0.0
                        count[x] += ok
                        vmin[x] = min(vmin[x], v) if ok else vmin[x]
                        vmax[x] = max(vmax[x], v) if ok else vmax[x]
                else:
                    for x in range(m):
                        v = row[x]
                        ok = v == v
                        total[x] += v if ok else 0.0
                        count[x] += ok
            for x in range(m):
                k = count[x]
                if k == 0:
                    image[y, x0 + x] = np.nan
                    used[y, x0 + x] = 0
                elif k <= nlow + nhigh:
                    image[y, x0 + x] = total[x] / k
                    used[y, x0 + x] = k
                elif extremes and max(abs(vmin[x]), abs(vmax[x])) > 1e7:
                    used[y, x0 + x] = 65535  # sentinel: redo exactly
                elif extremes:
                    kept = k - nlow - nhigh
                    image[y, x0 + x] = (total[x] - nlow * np.float64(vmin[x])
                                        - nhigh * np.float64(vmax[x])) / kept
                    used[y, x0 + x] = kept
                else:  # (vmin and vmax were not kept: 0 * inf would be NaN)
                    image[y, x0 + x] = total[x] / k
                    used[y, x0 + x] = k


#: Pixels whose running sums `mean_rows` keeps at once.
MEAN_SPAN = 512


@njit(nogil=True, cache=True)
def add_rows(rows, total, vmin, vmax, extremes):  # pragma: no cover - compiled
    """Add one frame's uint16 rows (h, w) to the running int32 totals, and to the running
    extremes when `extremes` (the streaming form of `mean_rows` for camera data)."""
    h, w = rows.shape
    for y in range(h):
        r = rows[y]
        t = total[y]
        if extremes:
            lo = vmin[y]
            hi = vmax[y]
            for x in range(w):
                v = r[x]
                t[x] += np.int32(v)
                lo[x] = min(lo[x], v)
                hi[x] = max(hi[x], v)
        else:
            for x in range(w):
                t[x] += np.int32(r[x])


@njit(nogil=True, cache=True)
def finish_rows(total, vmin, vmax, n, nlow, nhigh, image, used):  # pragma: no cover
    """The mean of n frames' running sums, dropping nlow lowest and nhigh highest (<= 1 each)
    values when more than nlow + nhigh frames were added: exactly `mean_rows`' values."""
    h, w = total.shape
    drop = n > nlow + nhigh
    kept = n - nlow - nhigh if drop else n
    for y in range(h):
        for x in range(w):
            t = np.float64(total[y, x])
            if drop:
                t = t - nlow * np.float64(vmin[y, x]) - nhigh * np.float64(vmax[y, x])
            image[y, x] = t / kept
            used[y, x] = kept


# --------------------------------------------------------------------------------------------
# sorted tiles: a sorting network applied to TILE pixels at once
#
# A tile holds the N values of TILE neighbouring pixels as N rows of TILE values (the layout
# the frames already have, so loading it is a copy of row segments). One comparator of a
# sorting network is then a min and a max of two rows: vector instructions over TILE pixels,
# with no branch. Sorted, everything a rejection needs is an index: the median is the
# middle, min/max drops the ends, and the set a sigma clip keeps is always a contiguous range
# of the sorted values (it keeps an interval of values), so each iteration only moves the
# two ends of that range. Measured on one thread, 3-sigma clip to convergence: N=50 from
# ~340 ns a pixel (quickselects) to ~115 (float32) and ~70 (uint16), N=200 from ~1.7 us to
# ~0.62 and ~0.42 us; with the network's stages in registers (`network`) and iterations
# that update their moments, N=50 ~78 and ~55 ns, N=200 ~0.37 and ~0.25 us.

#: Pixels per sorted tile (a compile-time constant, so that the row loops vectorize fully):
#: 64 measured best for uint16 (1.5x faster than 32) and as good as 32 for float32; 16 is
#: 3-4x slower.
TILE = 64

def batcher(n: int) -> np.ndarray:
    """Comparators (i, j), i < j, of Batcher's odd-even merge sort for n values, (K, 2).

    Built for the next power of two and truncated: a comparator with j >= n would only ever
    meet the +inf padding, which never moves, so it is left out.
    """
    size = 1
    while size < n:
        size *= 2
    pairs = []
    p = 1
    while p < size:
        k = p
        while k >= 1:
            for j in range(k % p, size - k, 2 * k):
                for i in range(min(k, size - j - k)):
                    if (i + j) // (2 * p) == (i + j + k) // (2 * p) and i + j + k < n:
                        pairs.append((i + j, i + j + k))
            k //= 2
        p *= 2
    return np.array(pairs, dtype=np.int64).reshape(-1, 2)


#: The comparators `stacker._registers.sort_group` applies to each group of GROUP rows, and
#: those `merge_group` applies: the last four half-cleaners of a bitonic merge (distances
#: 8, 4, 2, 1), which never leave an aligned group.
GROUP_SORT = batcher(GROUP)
GROUP_MERGE = np.array([(i, i + d) for d in (8, 4, 2, 1) for i in range(GROUP) if not i & d],
                       dtype=np.int64)


def comparators(n: int) -> np.ndarray:
    """Every comparator of `network(n)` in the order the tile sort applies them, (K, 2):
    what the compiled sort does, for tests and the uncompiled fallback."""
    pairs, levels = network(n)
    groups = range(0, network_rows(n), GROUP)
    out = [GROUP_SORT + g for g in groups]
    for lv in range(len(levels) - 1):
        out.append(pairs[levels[lv]:levels[lv + 1]])
        out += [GROUP_MERGE + g for g in groups]
    return np.concatenate(out)


def register_source() -> str:
    """The source of `stacker._registers` (generated: a test checks the file against this).

    numba keeps a function's scalars in registers and vectorizes its loop over the TILE
    pixels; GROUP rows named one by one become GROUP vector registers. Indices are uint64
    and the rows' offsets constants, so that numba adds no negative-index wraparound and
    LLVM sees that rows never overlap (without both, the loop stayed scalar or paid
    run-time overlap checks at every call: 2x slower).
    """
    def body(name: str, pairs: np.ndarray, doc: str) -> list[str]:
        lines = ["", "", "@njit(nogil=True, cache=True)",
                 f"def {name}(flat, base):  # pragma: no cover - compiled",
                 f'    """{doc}"""',
                 "    for p in range(np.uint64(TILE)):"]
        lines += [f"        v{i} = flat[base + p + np.uint64({i * TILE})]" for i in range(GROUP)]
        lines += [f"        v{a}, v{b} = min(v{a}, v{b}), max(v{a}, v{b})" for a, b in pairs]
        lines += [f"        flat[base + p + np.uint64({i * TILE})] = v{i}" for i in range(GROUP)]
        return lines

    head = ['"""Sorting network stages in registers (generated by',
            '`stacker._fast.register_source`: edit that, then write its output here).',
            "",
            "numba's cache of the kernels in `stacker._fast`, which have these compiled in, is",
            "keyed on _fast.py alone: a change made here by hand would not reach them.",
            '"""',
            "", "import numpy as np", "from numba import njit", "", f"TILE = {TILE}"]
    where = f"the {GROUP} rows from offset `base` of a flattened tile, by column."
    return "\n".join(head
                     + body("sort_group", GROUP_SORT, f"Sort {where}")
                     + body("merge_group", GROUP_MERGE, f"Half-clean (8 4 2 1) {where}")
                     ) + "\n"


@njit(nogil=True, cache=True)
def _new_tile(n, fill):  # pragma: no cover - compiled
    """A tile for N values (`network_rows(N)`, TILE), every value `fill` (+inf of its type):
    the rows past N sort last and stay there, as `_sorted_tile` needs."""
    return np.full((-(-n // GROUP) * GROUP, TILE), fill)


@njit(nogil=True, cache=True)
def _sorted_tile(block, y, x0, pairs, levels, fill, tile, count):  # pragma: no cover
    """Load pixels (y, x0 .. x0 + TILE) into tile (`network_rows(N)`, TILE) and sort every
    column (`network`); rows past N must hold `fill` (`_new_tile`).

    Missing values (NaN) become `fill`, +inf of the block's type, which sorts last; count[p]
    is the number of finite values of column p (columns beyond the block's edge hold
    anything). An integer (uint16) block has no missing values and sorts as integers: twice
    the pixels per vector instruction.
    """
    n = block.shape[0]
    m = min(TILE, block.shape[2] - x0)
    count[:] = 0
    if m == TILE:
        for i in range(n):
            row = block[i, y, x0:x0 + TILE]
            dst = tile[i]
            for p in range(TILE):
                v = row[p]
                ok = v == v
                dst[p] = v if ok else fill
                count[p] += ok
    else:
        for i in range(n):
            for p in range(TILE):
                v = block[i, y, x0 + p] if p < m else fill
                ok = v == v
                tile[i, p] = v if ok else fill
                count[p] += ok
    _sort_columns(tile, pairs, levels)


@njit(nogil=True, cache=True)
def _compare_exchange(flat, pairs):  # pragma: no cover - compiled
    """Apply the comparators `pairs` (rows) to all columns of a flattened integer tile.
    uint64 offsets, as in `stacker._registers`: 1.3x faster than indexing rows."""
    for q in range(pairs.shape[0]):
        a = np.uint64(pairs[q, 0]) * np.uint64(TILE)
        b = np.uint64(pairs[q, 1]) * np.uint64(TILE)
        for p in range(np.uint64(TILE)):
            x = flat[a + p]
            z = flat[b + p]
            flat[a + p] = min(x, z)
            flat[b + p] = max(x, z)


@njit(nogil=True, cache=True)
def _sort_groups(tile, pairs, levels):  # pragma: no cover - compiled
    """`network`'s stages on an integer tile (`_sort_columns`)."""
    flat = tile.reshape(-1)
    step = np.uint64(GROUP * TILE)
    end = np.uint64(tile.shape[0] * TILE)
    for base in range(np.uint64(0), end, step):
        sort_group(flat, base)
    for lv in range(levels.shape[0] - 1):
        _compare_exchange(flat, pairs[levels[lv]:levels[lv + 1]])
        for base in range(np.uint64(0), end, step):
            merge_group(flat, base)


@njit(nogil=True, cache=True)
def _flip_keys(keys):  # pragma: no cover - compiled
    """float32 bits (as int32) <-> keys whose signed order is the floats' order.

    A negative float's magnitude bits are inverted, so it orders below every larger value;
    the map is its own inverse. (-0.0 orders before +0.0, which compare equal anyway.)
    """
    mask = np.int32(0x7FFFFFFF)
    for i in range(keys.shape[0]):
        row = keys[i]
        for p in range(TILE):
            k = row[p]
            row[p] = k ^ ((k >> np.int32(31)) & mask)


def _sort_columns(tile, pairs, levels):  # pragma: no cover - replaced by the overload
    """Sort every column of `tile` (`network_rows(N)`, TILE) by `network(N)`.

    This Python form runs only with NUMBA_DISABLE_JIT (debugging); compiled callers get the
    overload below.
    """
    n = tile.shape[0]
    for i, j in comparators(n):
        low = np.minimum(tile[i], tile[j])
        tile[j] = np.maximum(tile[i], tile[j])
        tile[i] = low


@overload(_sort_columns, jit_options={"nogil": True})
def _sort_columns_impl(tile, pairs, levels):
    # Integer min/max vectorize on every x86 target; float32 compare-selects do not without
    # AVX-512 (on AVX2 they ran 4-5x slower than int32: 256 vs 49-63 ns per value and
    # network at N=50). So float32 is sorted as integer keys of the same order.
    if tile.dtype == types.float32:
        def impl(tile, pairs, levels):
            keys = tile.view(np.int32)
            _flip_keys(keys)
            _sort_groups(keys, pairs, levels)
            _flip_keys(keys)
        return impl

    def impl(tile, pairs, levels):
        _sort_groups(tile, pairs, levels)
    return impl


@njit(nogil=True, cache=True)
def _range_moments(tile, p, lo, hi, shift):  # pragma: no cover - compiled
    """(sum, sum of squares) of tile[lo:hi, p] - shift, in float64."""
    s1 = 0.0
    s2 = 0.0
    for i in range(lo, hi):
        d = np.float64(tile[i, p]) - shift
        s1 += d
        s2 += d * d
    return s1, s2


@njit(nogil=True, cache=True)
def _middle(tile, p, lo, hi):  # pragma: no cover - compiled
    """Median of the sorted tile[lo:hi, p]."""
    k = hi - lo
    return 0.5 * (np.float64(tile[lo + (k - 1) // 2, p]) + np.float64(tile[lo + k // 2, p]))


@njit(nogil=True, cache=True)
def sigma_clip_sorted(block, pairs, levels, fill, sigma_low, sigma_high, center_mean,
                      max_iterations, image, used):  # pragma: no cover - compiled
    """Iterative sigma clipping with the standard deviation as spread, on sorted tiles
    (see `stacker.kernels.SigmaClip`); `pairs, levels` is `network(N)`, `fill` +inf of the
    block's type (its largest value for integers).

    The moments of the kept range are taken about its median, which lies within one
    standard deviation of its mean: one pass, no cancellation whatever the data's offset.
    Each iteration then subtracts what it rejected and moves them to the new median
    (`CANCELLATION` says when it sums the kept range again instead).
    """
    n, h, w = block.shape
    tile = _new_tile(n, fill)
    count = np.empty(TILE, np.int64)
    centre0 = np.empty(TILE, np.float64)
    sum1 = np.empty(TILE, np.float64)
    sum2 = np.empty(TILE, np.float64)
    for y in range(h):
        for x0 in range(0, w, TILE):
            _sorted_tile(block, y, x0, pairs, levels, fill, tile, count)
            # The first iteration's moments for all columns at once, row by row (vectorized):
            # 4x less time than walking each column, which is most of the rest.
            for p in range(TILE):
                centre0[p] = _middle(tile, p, 0, count[p]) if count[p] > 0 else 0.0
                sum1[p] = 0.0
                sum2[p] = 0.0
            for i in range(n):
                row = tile[i]
                for p in range(TILE):
                    v = row[p]
                    d = np.float64(v) - centre0[p] if v < np.inf else 0.0
                    sum1[p] += d
                    sum2[p] += d * d
            for p in range(min(TILE, w - x0)):
                lo = 0
                hi = count[p]
                if hi == 0:
                    image[y, x0 + p] = np.nan
                    used[y, x0 + p] = 0
                    continue
                median = centre0[p]
                s1 = sum1[p]
                s2 = sum2[p]
                iteration = 0
                while max_iterations < 0 or iteration < max_iterations:
                    iteration += 1
                    k = hi - lo
                    mean = median + s1 / k
                    std = np.sqrt(max(s2 / k - (s1 / k) ** 2, 0.0))
                    centre = mean if center_mean else median
                    lower = centre - sigma_low * std * (1 + SLACK)
                    upper = centre + sigma_high * std * (1 + SLACK)
                    new_lo = lo
                    while new_lo < hi and tile[new_lo, p] < lower:
                        new_lo += 1
                    new_hi = hi
                    while new_hi > new_lo and tile[new_hi - 1, p] > upper:
                        new_hi -= 1
                    if new_hi == new_lo or (new_lo == lo and new_hi == hi):
                        break  # converged, or it would reject everything
                    # The moments of the kept range are those of the old one less the values
                    # just rejected, moved to the new median: O(rejected) instead of a pass
                    # over the kept values (~90 of the 472 ns a pixel at N=200, uint16).
                    r1, r2 = _range_moments(tile, p, lo, new_lo, median)
                    t1, t2 = _range_moments(tile, p, new_hi, hi, median)
                    s1 -= r1 + t1
                    s2 -= r2 + t2
                    lo = new_lo
                    hi = new_hi
                    new_median = _middle(tile, p, lo, hi)
                    if r2 + t2 > CANCELLATION * s2:
                        # Most of the sum of squares was rejected: the difference lost too
                        # many bits, so sum the kept values again.
                        s1, s2 = _range_moments(tile, p, lo, hi, new_median)
                    else:
                        d = new_median - median
                        s2 += (hi - lo) * d * d - 2 * d * s1
                        s1 -= (hi - lo) * d
                    median = new_median
                k = hi - lo
                image[y, x0 + p] = median + s1 / k
                used[y, x0 + p] = k


@njit(nogil=True, cache=True)
def trimmed_sorted(block, pairs, levels, fill, nlow, nhigh, middle, image,
                   used):  # pragma: no cover - compiled
    """Per pixel on sorted tiles: the median (`middle`), or the mean after dropping the
    nlow lowest and nhigh highest values (all of them averaged when no more are left)."""
    n, h, w = block.shape
    tile = _new_tile(n, fill)
    count = np.empty(TILE, np.int64)
    for y in range(h):
        for x0 in range(0, w, TILE):
            _sorted_tile(block, y, x0, pairs, levels, fill, tile, count)
            for p in range(min(TILE, w - x0)):
                k = count[p]
                if k == 0:
                    image[y, x0 + p] = np.nan
                    used[y, x0 + p] = 0
                elif middle:
                    image[y, x0 + p] = _middle(tile, p, 0, k)
                    used[y, x0 + p] = k
                else:
                    lo, hi = (nlow, k - nhigh) if k > nlow + nhigh else (0, k)
                    total = 0.0
                    for i in range(lo, hi):
                        total += tile[i, p]
                    image[y, x0 + p] = total / (hi - lo)
                    used[y, x0 + p] = hi - lo


# --------------------------------------------------------------------------------------------
# statistics of a finished master (read back strip by strip)


@njit(nogil=True, cache=True)
def _key(u):  # pragma: no cover - compiled
    """Order-preserving uint32 key of float32 bits `u`: flip the sign bit of positives and
    every bit of negatives, and unsigned order is float order (NaN excluded)."""
    if u & np.uint32(0x80000000):
        return ~u & np.uint32(0xFFFFFFFF)
    return u | np.uint32(0x80000000)


@njit(nogil=True, cache=True)
def summarize(image, bits, hist, row_s1, row_s2):  # pragma: no cover - compiled
    """(count, min, max) of the finite values of a float32 image (h, w); row_s1[y] and
    row_s2[y] get each row's sum and sum of squares (float64), and `hist` (65536 bins) the
    top 16 bits of every finite value's key. `bits` is the image viewed as uint32."""
    count = 0
    lo = np.inf
    hi = -np.inf
    h, w = image.shape
    for y in range(h):
        s1 = 0.0
        s2 = 0.0
        for x in range(w):
            v = image[y, x]
            if np.isfinite(v):
                z = np.float64(v)
                count += 1
                s1 += z
                s2 += z * z
                lo = min(lo, z)
                hi = max(hi, z)
                hist[_key(bits[y, x]) >> 16] += 1
        row_s1[y] = s1
        row_s2[y] = s2
    return count, lo, hi


@njit(nogil=True, cache=True)
def low_histogram(words, bin0, bin1, low):  # pragma: no cover - compiled
    """For the finite values whose key's top 16 bits are bin0 (bin1), count the low 16 bits
    in low[0] (low[1]). `words` are float32 values as the file holds them: big-endian,
    read as uint32 words, so the master is histogrammed straight from the bytes read."""
    flat = words.ravel()
    for i in range(flat.size):
        w = flat[i]
        # byte swap (one instruction once compiled), then the float32 bits are native
        u = ((w >> 24) | ((w >> 8) & np.uint32(0xFF00)) | ((w << 8) & np.uint32(0xFF0000))
             | (w << 24)) & np.uint32(0xFFFFFFFF)
        if u & np.uint32(0x7F800000) != np.uint32(0x7F800000):  # finite
            k = _key(u)
            top = k >> 16
            if top == bin0:
                low[0, k & 0xFFFF] += 1
            if top == bin1:
                low[1, k & 0xFFFF] += 1


@njit(nogil=True, cache=True)
def _bin(x, edges, inclusive):  # pragma: no cover - compiled
    """Bin of x among uniform `edges` ([e_b, e_b+1), the last bin closed when `inclusive`),
    or -1 outside. Estimated by arithmetic, then settled against the edges themselves so
    that histogram and collection agree to the last bit."""
    nb = edges.size - 1
    lo = edges[0]
    hi = edges[nb]
    if not (x >= lo) or x > hi or (x == hi and not inclusive):
        return -1
    b = min(int((x - lo) / (hi - lo) * nb), nb - 1)
    while b < nb - 1 and x >= edges[b + 1]:
        b += 1
    while b > 0 and x < edges[b]:
        b -= 1
    return b


@njit(nogil=True, cache=True)
def histogram(values, edges, inclusive, counts):  # pragma: no cover - compiled
    """Add the finite values' bin counts to `counts`."""
    for v in values.ravel():
        b = _bin(np.float64(v), edges, inclusive)
        if b >= 0:
            counts[b] += 1


# --------------------------------------------------------------------------------------------
# block means and row/column profiles of a finished master, in one pass per strip


@njit(nogil=True, cache=True, fastmath={"reassoc"})
def block_profile_sums(strip, y0, ny, factor, acc, acc_miss, block_sum, block_n, row_sum,
                       row_n, col_sum, col_miss):  # pragma: no cover - compiled
    """Add rows ``[y0, y0 + h)`` of an ``ny``-row image to NaN-aware running sums.

    Every finite pixel (NaN and inf are skipped) adds its value, in float64, to its row
    (``row_sum``/``row_n``, written whole), its column (``col_sum``; ``col_miss`` counts the
    column's skipped pixels) and its ``factor x factor`` block (``block_sum``/``block_n``,
    written when the block's last row has been added). ``acc`` holds the column sums of the
    current row of blocks and ``acc_miss[:w]`` its skipped pixels per column, with their
    total in ``acc_miss[w]``: strips need not start on a block boundary, but must come in
    order, top to bottom, with ``acc`` and ``acc_miss`` zero before the first.

    Each pixel is touched once, in a loop that vectorizes (``reassoc`` lets the row sum be
    split across vector lanes: it only changes the float64 rounding of a sum of float32
    values, exact in practice). Only rows with a skipped pixel pay for counting per column
    (a master rarely has any): without them the pixel loop stores nothing but ``acc``, and
    a finished row of blocks costs one pass over ``acc`` (4096x4096, blocks of 7, one
    thread, strip in cache: 8.3 -> 5.2 ms against counting every pixel).
    """
    h, w = strip.shape
    nbx = block_sum.shape[1]
    for r in range(h):
        y = y0 + r
        row = strip[r]
        s = 0.0
        n = 0
        for x in range(w):
            v = row[x]
            ok = np.isfinite(v)
            d = np.float64(v) if ok else 0.0
            acc[x] += d
            s += d
            n += ok
        row_sum[y] = s
        row_n[y] = n
        if n < w:
            for x in range(w):
                acc_miss[x] += not np.isfinite(row[x])
            acc_miss[w] += w - n
        if (y + 1) % factor == 0 or y == ny - 1:
            by = y // factor
            height = y - by * factor + 1
            for bx in range(nbx):
                x0 = bx * factor
                x1 = min(w, x0 + factor)
                t = 0.0
                for x in range(x0, x1):
                    t += acc[x]
                block_sum[by, bx] = t
                block_n[by, bx] = height * (x1 - x0)
            for x in range(w):
                col_sum[x] += acc[x]
                acc[x] = 0.0
            if acc_miss[w]:
                for bx in range(nbx):
                    m = 0
                    for x in range(bx * factor, min(w, (bx + 1) * factor)):
                        m += acc_miss[x]
                        col_miss[x] += acc_miss[x]
                        acc_miss[x] = 0
                    block_n[by, bx] -= m
                acc_miss[w] = 0


@njit(nogil=True, cache=True)
def neighbour_median(padded, step, out):  # pragma: no cover - compiled
    """``out[y, x]``: ``np.median`` of the 8 neighbours at distance `step` of
    ``padded[y + step, x + step]``, in the input's precision: the mean of ranks 3 and 4 as
    numpy takes it (their sum, halved), NaN when a neighbour is NaN.

    The 8 values go through a min/max network in registers (Knuth's 19-comparator network
    of 8 without the two comparators that leave ranks 3 and 4 alone), pixel after pixel of
    a row, so the loop vectorizes (~2 ns a pixel): np.median over a stack of 8 shifted
    copies partitions along a strided axis, ~0.25 us a pixel (two passes over a 4096x4096
    master dark were ~7 s of quality control).
    """
    h, w = out.shape
    for y in range(h):
        up = padded[y]
        mid = padded[y + step]
        down = padded[y + 2 * step]
        for x in range(w):
            v0 = up[x]
            v1 = up[x + step]
            v2 = up[x + 2 * step]
            v3 = mid[x]
            v4 = mid[x + 2 * step]
            v5 = down[x]
            v6 = down[x + step]
            v7 = down[x + 2 * step]
            nan = (v0 != v0) | (v1 != v1) | (v2 != v2) | (v3 != v3) | (v4 != v4) \
                | (v5 != v5) | (v6 != v6) | (v7 != v7)
            v0, v2 = min(v0, v2), max(v0, v2)
            v1, v3 = min(v1, v3), max(v1, v3)
            v4, v6 = min(v4, v6), max(v4, v6)
            v5, v7 = min(v5, v7), max(v5, v7)
            v0, v4 = min(v0, v4), max(v0, v4)
            v1, v5 = min(v1, v5), max(v1, v5)
            v2, v6 = min(v2, v6), max(v2, v6)
            v3, v7 = min(v3, v7), max(v3, v7)
            v0, v1 = min(v0, v1), max(v0, v1)
            v2, v3 = min(v2, v3), max(v2, v3)
            v4, v5 = min(v4, v5), max(v4, v5)
            v6, v7 = min(v6, v7), max(v6, v7)
            v2, v4 = min(v2, v4), max(v2, v4)
            v3, v5 = min(v3, v5), max(v3, v5)
            v1, v4 = min(v1, v4), max(v1, v4)
            v3, v6 = min(v3, v6), max(v3, v6)
            v3, v4 = min(v3, v4), max(v3, v4)
            s = v3 + v4  # in the input's precision, as numpy's mean of the two
            out[y, x] = np.nan if nan else s * 0.5
    return out


@njit(nogil=True, cache=True)
def label8(mask, labels):  # pragma: no cover - compiled
    """``labels[y, x]``: the number (from 1) of the 8-connected region of True cells that
    holds (y, x), regions numbered in raster order of their first cell; untouched (0) off
    the mask. Returns the number of regions. Breadth-first, with one queue for all."""
    h, w = mask.shape
    queue = np.empty(h * w, np.int64)
    n = 0
    for y0 in range(h):
        for x0 in range(w):
            if not mask[y0, x0] or labels[y0, x0] != 0:
                continue
            n += 1
            labels[y0, x0] = n
            queue[0] = y0 * w + x0
            head, tail = 0, 1
            while head < tail:
                cy, cx = divmod(queue[head], w)
                head += 1
                for y in range(max(cy - 1, 0), min(cy + 2, h)):
                    for x in range(max(cx - 1, 0), min(cx + 2, w)):
                        if mask[y, x] and labels[y, x] == 0:
                            labels[y, x] = n
                            queue[tail] = y * w + x
                            tail += 1
    return n


@njit(nogil=True, cache=True)
def heat_rgb(fraction, top, out):  # pragma: no cover - compiled
    """``out[y, x]``: black -> red -> yellow -> white for ``fraction / top`` (0..1), in one pass.

    The operations of `stacker.report.heat_image`'s numpy expression, in its order (NaN is
    0, values beyond the range are clipped, each channel truncated to uint8), without its
    eleven full-size temporaries.
    """
    h, w = fraction.shape
    for y in range(h):
        for x in range(w):
            f = fraction[y, x] / top if top > 0 else fraction[y, x] * 0.0
            v = 0.0 if f != f else min(max(f, 0.0), 1.0)
            t = 3.0 * v
            out[y, x, 0] = np.uint8(min(max(t, 0.0), 1.0) * 255.0)
            out[y, x, 1] = np.uint8(min(max(t - 1.0, 0.0), 1.0) * 255.0)
            out[y, x, 2] = np.uint8(min(max(t - 2.0, 0.0), 1.0) * 255.0)


@njit(nogil=True, cache=True)
def _ready():  # pragma: no cover - compiled
    return 0


class _NoScipyLinalgHere:
    """An import hook that hides scipy.linalg from the thread that installed it, and only
    there.

    Numba's CPU target, set up at the first compiled call, imports scipy.linalg whenever
    scipy is installed, only to learn whether BLAS is there for np.inner-style code; no
    kernel here uses BLAS, and that import took 0.35-0.4 s of numba's ~0.8 s of start-up in
    every run. Without it numba uses its own loops for those functions (same results; its
    linear algebra still finds BLAS when compiled); scipy.linalg imports normally afterwards
    and other threads never see this.
    """

    def __init__(self) -> None:
        self.owner = threading.get_ident()

    def find_spec(self, name, path=None, target=None):
        if name.startswith("scipy.linalg") and threading.get_ident() == self.owner:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


def _set_up_target() -> None:
    """Set numba's CPU target up now, once per process, without scipy.linalg when it is not
    already loaded (see `_NoScipyLinalgHere`)."""
    hook = None if "scipy.linalg" in sys.modules else _NoScipyLinalgHere()
    # sys.meta_path is replaced, never changed in place: an import running in another
    # thread iterates the list it started with, and an in-place removal could make it
    # skip a finder (and fail).
    if hook is not None:
        sys.meta_path = [hook, *sys.meta_path]
    try:
        _ready()
    finally:
        if hook is not None:
            sys.meta_path = [f for f in sys.meta_path if f is not hook]


_set_up_target()
