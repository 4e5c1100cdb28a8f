"""The Dask graph of one master: lazy frame stack -> per-strip kernel -> chunked store.

The stack is a Dask array (N, ny, nx) with one chunk per full-width strip of rows: each
chunk is read by one task that reads that strip from all N files (no `da.stack` of N
per-file arrays and no rechunk, which would build tens of thousands of tasks). The kernel
reduces each chunk along the frame axis; `da.store` writes each reduced strip into the
preallocated master file as soon as it is done, so at most `num_workers` strips are held.
`combine_into` runs that graph in its fused form (one read-reduce-write task per strip)
without building the array, which spares each run the import of ``dask.array``.
"""

from __future__ import annotations

import queue
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass

import numpy as np

from stacker.io import MasterWriter, StripReader, plan_strips

#: Pixels sampled per frame to measure a flat's level (evenly spaced full rows).
LEVEL_SAMPLE_PIXELS = 1_000_000


def frame_stack(reader: StripReader, strips: Sequence[tuple[int, int]]):
    """A lazy (N, ny, nx) float32 Dask array with one chunk (one read task) per strip.

    Built with `map_blocks` and no input array, the read is a blockwise layer: Dask fuses it
    with the kernel and the store into a single task per strip, so a strip is read, reduced
    and written by one worker before it takes the next (bounded memory, a tiny graph).
    """
    import dask.array as da
    from dask.base import tokenize

    n, _, nx = reader.shape
    chunks = ((n,), tuple(y1 - y0 for y0, y1 in strips), (nx,))
    return da.map_blocks(_read_block, reader, chunks=chunks, dtype=np.float32,
                         meta=np.empty((0, 0, 0), dtype=np.float32),
                         name="frames-" + tokenize(reader, tuple(strips)))


def _read_block(reader: StripReader, block_info=None) -> np.ndarray:
    y0, y1 = block_info[None]["array-location"][1]
    return reader.read(y0, y1)


@dataclass(frozen=True)
class Prepare:
    """Per-frame work before rejection: subtract a master, then scale each frame.

    Attributes
    ----------
    calibration : StripReader or None
        Reader of the master (dark or bias) subtracted from every frame.
    scales : tuple of float or None
        Multiplicative factor per frame (a flat scaled to the common level).
    """

    calibration: StripReader | None = None
    scales: tuple[float, ...] | None = None

    def __call__(self, block: np.ndarray, y0: int, y1: int) -> np.ndarray:
        """Apply to a float32 block (N, y1 - y0, nx) of rows [y0, y1), in place."""
        if self.calibration is not None:
            block -= self.calibration.read(y0, y1)[0]
        if self.scales is not None:
            block *= np.asarray(self.scales, dtype=np.float32)[:, None, None]
        return block


def _reduce(block: np.ndarray, kernel: Callable, prepare: Prepare | None,
            block_info=None) -> np.ndarray:
    y0, y1 = block_info[0]["array-location"][1]
    if prepare is not None:
        block = prepare(block, y0, y1)
    image, used = kernel(block)
    out = np.empty((2, *image.shape), dtype=np.float32)
    out[0] = image
    out[1] = used
    return out


def reduce_stack(stack, kernel: Callable, prepare: Prepare | None = None):
    """Reduce every chunk of the stack along the frame axis -> (2, ny, nx): image, n_used."""
    return stack.map_blocks(_reduce, kernel, prepare, dtype=np.float32,
                            chunks=((2,), stack.chunks[1], stack.chunks[2]),
                            meta=np.empty((0, 0, 0), dtype=np.float32))


def combine_into(reader: StripReader, writer: MasterWriter, kernel: Callable, rows: int,
                 *, prepare: Prepare | None = None, num_workers: int = 1,
                 callbacks: Sequence = ()) -> None:
    """Build the master: read, prepare, reduce and store strip by strip, in parallel.

    The graph is the one `frame_stack` -> `reduce_stack` -> ``da.store`` fuses to (one task
    per strip that reads, reduces and writes it), written out directly and run by Dask's
    threaded scheduler: the result is the same, and a run does not pay the ~0.3-0.4 s of
    importing ``dask.array`` (a tenth of a 50-frame master's time).
    """
    from dask.threaded import get

    strips = plan_strips(reader.shape[1], rows)
    n, _, nx = reader.shape
    # One block per worker, reused strip after strip: a fresh block of hundreds of MB per
    # strip would be page-faulted in (and zeroed by the kernel) every time.
    blocks: queue.SimpleQueue = queue.SimpleQueue()
    for _ in range(min(num_workers, len(strips))):
        blocks.put(np.empty(n * min(rows, reader.shape[1]) * nx, np.float32))
    graph = {("strip", i): (_strip_task, reader, writer, kernel, prepare, y0, y1, blocks)
             for i, (y0, y1) in enumerate(strips)}
    with ExitStack() as stack:
        for callback in callbacks:
            stack.enter_context(callback)
        get(graph, list(graph), num_workers=num_workers)


def _strip_task(reader: StripReader, writer: MasterWriter, kernel: Callable,
                prepare: Prepare | None, y0: int, y1: int, blocks: queue.SimpleQueue) -> None:
    buffer = blocks.get()
    try:
        n, _, nx = reader.shape
        block = reader.read(y0, y1, out=buffer[: n * (y1 - y0) * nx].reshape(n, y1 - y0, nx))
        if prepare is not None:
            block = prepare(block, y0, y1)
        image, used = kernel(block)
    finally:
        blocks.put(buffer)
    writer.write(y0, image, used)


def sample_rows(ny: int, nx: int, pixels: int = LEVEL_SAMPLE_PIXELS) -> list[int]:
    """Evenly spaced rows holding about `pixels` pixels (all rows of a small frame)."""
    k = min(ny, max(1, -(-pixels // nx)))
    return sorted({round(r) for r in np.linspace(0, ny - 1, k)})


@dataclass(frozen=True)
class MasterStats:
    """Statistics of a finished master image and of its frames-used map."""

    mean: float
    median: float
    std: float
    min: float
    max: float
    n_nan: int
    used_mean: float
    used_min: int
    used_max: int

    def scaled(self, factor: float) -> MasterStats:
        """The statistics of the image divided by `factor` (used-frame counts unchanged)."""
        return MasterStats(self.mean / factor, self.median / factor, self.std / factor,
                           self.min / factor, self.max / factor, self.n_nan, self.used_mean,
                           self.used_min, self.used_max)


def master_statistics(writer: MasterWriter, rows: int) -> MasterStats:
    """Exact statistics of the image written so far, read back strip by strip.

    The master is N times smaller than its inputs, so this pass is cheap; the median is
    exact (histogram refinement, `_exact_median`) without holding the image in memory.
    """
    from stacker import _fast

    ny, _ = writer.shape
    strips = plan_strips(ny, rows)
    total = s1 = s2 = 0.0
    lo, hi = np.inf, -np.inf
    used_sum, used_lo, used_hi = 0.0, np.iinfo(np.int32).max, 0
    for y0, y1 in strips:
        count, a1, a2, a_lo, a_hi = _fast.moments(writer.read_image(y0, y1))
        total, s1, s2 = total + count, s1 + a1, s2 + a2
        lo, hi = min(lo, a_lo), max(hi, a_hi)
        used = writer.read_count(y0, y1)
        used_sum += used.sum()
        used_lo, used_hi = min(used_lo, int(used.min())), max(used_hi, int(used.max()))
    n_nan = ny * writer.shape[1] - int(total)
    if total == 0:
        nan = float("nan")
        return MasterStats(nan, nan, nan, nan, nan, n_nan, 0.0, used_lo, used_hi)
    mean = s1 / total
    std = float(np.sqrt(max(s2 / total - mean * mean, 0.0)))
    median = _exact_median(writer, strips, lo, hi, int(total))
    return MasterStats(float(mean), median, std, float(lo), float(hi), n_nan,
                       float(used_sum / (ny * writer.shape[1])), used_lo, used_hi)


def _exact_median(writer: MasterWriter, strips, lo: float, hi: float, n: int) -> float:
    """Median of the finite image values by narrowing a histogram until a bin is small."""
    k1, k2 = (n - 1) // 2, n // 2
    a, b = _kth(writer, strips, lo, hi, k1, k2)
    if b is None:  # the two middle values fell in different bins (rare): find the upper one
        b, _ = _kth(writer, strips, lo, hi, k2, k2)
    return float((a + b) / 2)


def _kth(writer: MasterWriter, strips, lo: float, hi: float, k: int,
         k2: int) -> tuple[float, float | None]:
    """The k-th (and, if in the same final bin, the k2-th) smallest finite value (0-based)
    of the image, all of whose finite values lie in [lo, hi]."""
    from stacker import _fast

    below = 0  # values known to rank before the current range
    last = True  # whether the current range includes `hi` (only the top bin does)
    for _ in range(64):  # each pass narrows the range 4096-fold; float64 runs out first
        if lo >= hi:
            return float(lo), float(lo)
        edges = np.linspace(lo, hi, 4097)
        counts = np.zeros(4096, dtype=np.int64)
        for y0, y1 in strips:
            _fast.histogram(writer.read_image(y0, y1), edges, last, counts)
        cum = np.cumsum(counts)
        b = int(np.searchsorted(cum, k - below, side="right"))
        below += int(cum[b - 1]) if b > 0 else 0
        last = last and b == 4095
        lo, hi = edges[b], edges[b + 1]
        if counts[b] <= 2_000_000:
            values = np.empty(int(counts[b]), np.float64)
            end = 0
            for y0, y1 in strips:
                end = _fast.collect(writer.read_image(y0, y1), lo, hi, last, values, end)
            if k2 - below < values.size:
                part = np.partition(values, [k - below, k2 - below])
                return float(part[k - below]), float(part[k2 - below])
            return float(np.partition(values, k - below)[k - below]), None
    raise RuntimeError("median did not converge")  # pragma: no cover


def normalize_in_place(writer: MasterWriter, factor: float, rows: int) -> None:
    """Divide the written image by `factor`, strip by strip (the flat's normalization)."""
    for y0, y1 in plan_strips(writer.shape[0], rows):
        writer.rewrite_image(y0, writer.read_image(y0, y1) / np.float32(factor))
