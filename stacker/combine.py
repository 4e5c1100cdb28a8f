"""The Dask graph of one master: lazy frame stack -> per-strip kernel -> chunked store.

The stack is a Dask array (N, ny, nx) with one chunk per full-width strip of rows: each
chunk is read by one task that reads that strip from all N files (no `da.stack` of N
per-file arrays and no rechunk, which would build tens of thousands of tasks). The kernel
reduces each chunk along the frame axis; `da.store` writes each reduced strip into the
preallocated master file as soon as it is done, so at most `num_workers` strips are held.
`combine_into` runs that graph in its fused form (one read-reduce-write task per strip) on a
thread pool, without building the array, which spares each run the import of Dask; it also
gathers the master's statistics from the strips as they are written (`StripSummary`).
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from dataclasses import dataclass

import numpy as np

from stacker.io import MasterWriter, StripReader, pass_rows, plan_strips
from stacker.kernels import RunningSums

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

    def read(self, reader: StripReader, y0: int, y1: int, out: np.ndarray) -> np.ndarray:
        """Read rows [y0, y1) of every frame into the float32 `out` and apply to each frame
        as soon as it is read: the same values as ``self(reader.read(...))``, while each
        frame's rows are still in cache (two passes over the whole block fewer)."""
        master = self.calibration.read(y0, y1)[0] if self.calibration is not None else None
        scales = np.asarray(self.scales, dtype=np.float32) if self.scales is not None else None
        return reader.read(y0, y1, out, master, scales)


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
                 progress: Callable[[int, int], None] | None = None) -> MasterStats:
    """Build the master: read, prepare, reduce and store strip by strip, in parallel.

    Each strip is one task that reads, reduces and writes it: the graph `frame_stack` ->
    `reduce_stack` -> ``da.store`` fuses to. Its tasks are independent, so a plain thread pool
    runs them (the kernels release the GIL): the result is the same as Dask's threaded
    scheduler, without the ~0.15 s import of ``dask`` and ~0.3 s of ``dask.array`` in every
    run. A cluster run still goes through dask.distributed (`stacker.cluster`), one master
    per task, each built by this function on its worker.

    Parameters
    ----------
    rows : int
        Rows per strip: of a block of all the frames, or of running sums when the kernel
        takes the frames one at a time (`streams`; `stacker.engine.strip_rows` gives both).
    progress : callable, optional
        ``progress(done, total)`` with the number of strips written, from 0.

    Returns
    -------
    MasterStats
        Exact statistics of the written image and frames-used map, gathered from each strip
        as it is written (the median needs one read-back pass over the image).
    """
    with reader.kept_open() as opened:
        return _combine_into(opened, writer, kernel, rows, prepare, num_workers, progress)


def _combine_into(reader: StripReader, writer: MasterWriter, kernel: Callable, rows: int,
                  prepare: Prepare | None, num_workers: int,
                  progress: Callable[[int, int], None] | None) -> MasterStats:
    n, ny, nx = reader.shape
    summary = StripSummary((ny, nx))
    # Camera data (uint16) without a per-frame correction stay integers: no conversion, half
    # the bytes, and the kernels sort twice the pixels per instruction.
    dtype = reader.dtype if prepare is None else np.float32
    if streams(kernel, dtype, n):
        # Mean and one-value min/max of camera data: each frame's rows are added to running
        # sums as they are read; no block of N frames is built, so a strip can be tall
        # whatever N is, and tall strips mean few reads: their Python overhead, which holds
        # the GIL, was what limited the block path (N=200: 2.0 -> 0.95 s on two threads).
        # Memory: whatever N, `stream_rows` (a few MB per worker through the page cache,
        # reads of up to 16 MiB per frame within the budget around it). Around the cache,
        # the frames' rows come from reads in flight on the reader threads, in whatever
        # order they complete: 200 full frames not in the cache, mean, 12.0-12.9 s against
        # 16.4-26 s through the cache (its CPU cost, and reclaiming it); the disk reads
        # them whole in 8.6-9.6 s.
        tasks = [(_running_task, reader, writer, kernel.running, y0, y1, summary)
                 for y0, y1 in plan_strips(ny, rows)]
        blocks = None
    else:
        strips = plan_strips(ny, rows)
        blocks = StripBlocks(reader, prepare, strips, dtype, min(num_workers, len(strips)))
        tasks = [(_strip_task, blocks, writer, kernel, k, y0, summary)
                 for k, (y0, _) in enumerate(strips)]
    try:
        _run_tasks(tasks, num_workers, progress)
    finally:
        if blocks is not None:
            blocks.close()
    return summary.result(writer, rows, num_workers)


def streams(kernel: Callable, dtype, n: int) -> bool:
    """Whether `combine_into` reduces `n` frames of `dtype` one frame at a time into
    running sums (the mean and one-value min/max of camera data), holding no block of all
    the frames: its memory then does not grow with `n` (`stacker.io.stream_rows`)."""
    running = getattr(kernel, "running", None)
    return (running is not None and np.dtype(dtype) == np.uint16
            and n <= RunningSums.MAX_FRAMES and running((1, 1)) is not None)


def _run_tasks(tasks: list, num_workers: int,
               progress: Callable[[int, int], None] | None) -> None:
    """Run the strip tasks in order on `num_workers` threads."""
    if progress is not None:
        progress(0, len(tasks))
    if num_workers <= 1:
        for done, (task, *args) in enumerate(tasks, 1):
            task(*args)
            if progress is not None:
                progress(done, len(tasks))
    else:
        with ThreadPoolExecutor(max_workers=num_workers,
                                thread_name_prefix="stacker-strip") as pool:
            futures = [pool.submit(*task) for task in tasks]
            try:
                for done, future in enumerate(as_completed(futures), 1):
                    future.result()
                    if progress is not None:
                        progress(done, len(tasks))
            except BaseException:
                # Stop handing out strips; leaving the pool waits for the ones running,
                # so that nothing writes to the master after the caller aborts it.
                for future in futures:
                    future.cancel()
                raise


def _running_task(reader: StripReader, writer: MasterWriter, running: Callable, y0: int,
                  y1: int, summary: StripSummary) -> None:
    n, _, nx = reader.shape
    sums = running((y1 - y0, nx))
    if reader.add_frames(y0, y1, sums.total, sums.vmin, sums.vmax, sums.extremes):
        sums.added(n)
    else:
        sums = running((y1 - y0, nx))  # (fresh: a failed compiled loop added some frames)
        for rows in reader.frame_rows(y0, y1, np.uint16):
            sums.add(rows)  # integer sums and extremes: the frames' order does not matter
    image, used = sums.result()
    writer.write(y0, image, used)
    summary.add(y0, image, used)


def _strip_task(blocks: StripBlocks, writer: MasterWriter, kernel: Callable, k: int,
                y0: int, summary: StripSummary) -> None:
    buffer, block = blocks.take(k)
    try:
        image, used = kernel(block)
    finally:
        blocks.give(buffer)
    writer.write(y0, image, used)
    summary.add(y0, image, used)


class StripBlocks:
    """The strips' blocks (N, rows, nx), read into a few buffers that are reused strip after
    strip (a fresh block per strip would be page-faulted in every time).

    Through the page cache (``reader.direct`` false) there is one buffer per worker and a
    worker reads its strip when it takes it: the OS reads ahead by itself. Around the page
    cache nothing reads ahead, and a worker would wait for the disk while the other one
    computes, then compute while the disk idles: there are two buffers per worker, and
    the next strip is read into a buffer as soon as it is given back, on one thread per
    buffer, while the workers reduce the strips before it: 200 full frames not in the page
    cache, 2 GB, 38.6 -> 30.2 s (and 21 s in the taller strips of `DIRECT_STRIP_CAP`).

    Parameters
    ----------
    reader, prepare
        What `_read` reads a strip with.
    strips : list of (y0, y1)
        In the order the workers take them (`take` with the index).
    workers : int
        Threads taking strips: one buffer of the tallest strip each, two when reading ahead.
    """

    def __init__(self, reader: StripReader, prepare: Prepare | None,
                 strips: Sequence[tuple[int, int]], dtype, workers: int) -> None:
        n, _, nx = reader.shape
        self._reader, self._prepare, self._strips = reader, prepare, strips
        tallest = max(y1 - y0 for y0, y1 in strips)
        free = [np.empty(n * tallest * nx, dtype)
                for _ in range(max(1, workers) * (2 if reader.direct else 1))]
        self._free: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._next = 0
        self._reads: list[Future] = [Future() for _ in strips]
        self._pool = ThreadPoolExecutor(len(free), thread_name_prefix="stacker-ahead") \
            if reader.direct else None
        for buffer in free:
            self.give(buffer)

    def take(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(buffer, block) of strip `k`: waits for its read ahead, or reads it now."""
        if self._pool is not None:
            return self._reads[k].result()
        buffer = self._free.get()
        try:
            return buffer, self._read(k, buffer)
        except BaseException:
            self._free.put(buffer)
            raise

    def give(self, buffer: np.ndarray) -> None:
        """Return a buffer taken with `take`; reading ahead, the next strip goes into it."""
        if self._pool is None:
            self._free.put(buffer)
            return
        with self._lock:
            k = self._next
            if k >= len(self._strips):
                return
            self._next += 1
            future = self._reads[k]
            if not future.set_running_or_notify_cancel():
                return
        self._pool.submit(self._read_ahead, k, buffer, future)

    def close(self) -> None:
        """Cancel the reads not started and wait for those running (which write into the
        buffers): nothing is read after the combine ends, whether it ended well or not."""
        if self._pool is None:
            return
        with self._lock:
            for future in self._reads:
                future.cancel()
        self._pool.shutdown(wait=True)

    def _read_ahead(self, k: int, buffer: np.ndarray, future: Future) -> None:
        try:
            future.set_result((buffer, self._read(k, buffer)))
        except BaseException as exc:
            future.set_exception(exc)
            # The strip is lost, its buffer is not: the next strip is read into it. Kept,
            # every failed read took a buffer away, and once they were all gone a worker
            # already waiting for a later strip waited forever (and the build with it).
            self.give(buffer)

    def _read(self, k: int, buffer: np.ndarray) -> np.ndarray:
        n, _, nx = self._reader.shape
        y0, y1 = self._strips[k]
        out = buffer[: n * (y1 - y0) * nx].reshape(n, y1 - y0, nx)
        if self._prepare is not None:
            return self._prepare.read(self._reader, y0, y1, out)
        return self._reader.read(y0, y1, out=out)


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


class StripSummary:
    """Statistics of a master gathered strip by strip, as the strips are written.

    Each strip adds its rows' sums, its extremes and frames-used counts, and a histogram of
    its values by the top 16 bits of their order-preserving 32-bit keys (`stacker._fast`):
    no range is needed in advance, and the two bins holding the middle ranks are known when
    the last strip is in. `result` reads the image back once to histogram the low 16 bits of
    the values in those bins, which gives the exact median. Strips may be added from several
    threads in any order: sums are kept per row and added in row order at the end, so the
    result does not depend on threads or strip heights (a cluster run equals a local one).
    """

    def __init__(self, shape: tuple[int, int]) -> None:
        ny, _ = shape
        self._lock = threading.Lock()
        self.count = 0
        self.row_s1 = np.zeros(ny, np.float64)
        self.row_s2 = np.zeros(ny, np.float64)
        self.lo = np.inf
        self.hi = -np.inf
        self.pixels = 0
        self.used_sum = 0
        self.used_lo = np.iinfo(np.int64).max
        self.used_hi = 0
        self.hist = np.zeros(KEY_BINS, np.int64)

    def add(self, y0: int, image: np.ndarray, used: np.ndarray) -> None:
        """Add the strip of rows [y0, y0 + h): the float32 image and its frames-used counts."""
        from stacker.compiled import summarize

        hist = np.zeros(KEY_BINS, np.int64)
        image = np.ascontiguousarray(image, dtype=np.float32)
        y1 = y0 + image.shape[0]
        count, lo, hi = summarize(image, image.view(np.uint32), hist, self.row_s1[y0:y1],
                                  self.row_s2[y0:y1])
        used = np.asarray(used)
        u_sum, u_lo, u_hi = int(used.sum(dtype=np.int64)), int(used.min()), int(used.max())
        with self._lock:
            self.count += count
            self.lo = min(self.lo, lo)
            self.hi = max(self.hi, hi)
            self.pixels += image.size
            self.used_sum += u_sum
            self.used_lo = min(self.used_lo, u_lo)
            self.used_hi = max(self.used_hi, u_hi)
            self.hist += hist

    def result(self, writer: MasterWriter, rows: int, workers: int = 1) -> MasterStats:
        """The statistics of everything added; reads the image back from `writer` once, on
        `workers` threads."""
        used_mean = self.used_sum / self.pixels if self.pixels else 0.0
        n_nan = self.pixels - self.count
        if self.count == 0:
            nan = float("nan")
            return MasterStats(nan, nan, nan, nan, nan, n_nan, used_mean, self.used_lo,
                               self.used_hi)
        mean = self.row_s1.sum() / self.count
        std = float(np.sqrt(max(self.row_s2.sum() / self.count - mean * mean, 0.0)))
        a, b = self._middle(writer, rows, workers)
        return MasterStats(float(mean), float((a + b) / 2), std, float(self.lo),
                           float(self.hi), n_nan, float(used_mean), self.used_lo, self.used_hi)

    def _middle(self, writer: MasterWriter, rows: int, workers: int = 1
                ) -> tuple[float, float]:
        """The values of ranks (n-1)//2 and n//2 (0-based) among the finite values.

        One pass over the written image, strip by strip on `workers` threads, each strip's
        big-endian words histogrammed as they are read: no byte-swapped copy (this pass
        was 0.14 s of a 1 s N=50 mean build, on one thread, through two copies).
        """
        from stacker.compiled import low_histogram

        ranks = ((self.count - 1) // 2, self.count // 2)
        cum = np.cumsum(self.hist)
        bins = [int(np.searchsorted(cum, k, side="right")) for k in ranks]
        within = [k - (int(cum[b - 1]) if b > 0 else 0) for k, b in zip(ranks, bins, strict=True)]
        nx = writer.shape[1]
        strips = _readback_strips(writer, rows)
        workers = max(1, min(workers, len(strips)))

        def count(part: Sequence[tuple[int, int]]) -> np.ndarray:
            low = np.zeros((2, KEY_BINS), np.int64)
            words = np.empty(max(y1 - y0 for y0, y1 in part) * nx, np.uint32)
            for y0, y1 in part:
                strip = writer.read_image_words(y0, y1, words[: (y1 - y0) * nx])
                low_histogram(strip, bins[0], bins[1], low)
            return low

        # One histogram per thread (its own strips), added at the end: no lock per strip.
        low = sum(_on_threads(count, [strips[i::workers] for i in range(workers)], workers,
                              "stacker-median"))
        keys = []
        for i in range(2):
            t = int(np.searchsorted(np.cumsum(low[i]), within[i], side="right"))
            keys.append((bins[i] << 16) | t)
        values = key_values(np.array(keys, np.uint32))
        return float(values[0]), float(values[1])


def key_values(keys: np.ndarray) -> np.ndarray:
    """The float32 values of order-preserving keys (the inverse of `stacker._fast._key`)."""
    keys = np.asarray(keys, np.uint32)
    negative = (keys & np.uint32(0x80000000)) == 0
    bits = np.where(negative, ~keys, keys & np.uint32(0x7FFFFFFF)).astype(np.uint32)
    return bits.view(np.float32)


#: Bytes of the image read at a time by a pass over a written master (median, normalization).
READBACK_BYTES = 2 * 1024 * 1024


def _readback_strips(writer: MasterWriter, rows: int) -> list[tuple[int, int]]:
    """Strips of about `READBACK_BYTES` of a written image, at most `rows` high (the budget):
    cache-sized, and a few MB per thread whatever the budget."""
    ny, nx = writer.shape
    return plan_strips(ny, pass_rows(nx, rows, READBACK_BYTES))


def _on_threads(fn: Callable, items: Sequence, workers: int, name: str) -> list:
    """``[fn(item) for item in items]``, on up to `workers` threads (`threaded`)."""
    return list(threaded(fn, items, min(workers, len(items)), name))


def threaded(fn: Callable, items: Iterable, workers: int,
             name: str = "stacker-pass") -> Iterator:
    """``map(fn, items)`` on up to `workers` threads, in order (`fn` releases the GIL: file
    reads and writes, compiled loops, numpy). Items are taken from `items` as results are
    handed out, at most ``2 * workers`` at a time, so a pass over strips holds a few strips,
    not the image."""
    if workers <= 1:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(workers, thread_name_prefix=name) as pool:
        pending: deque = deque()
        try:
            for item in items:
                pending.append(pool.submit(fn, item))
                if len(pending) >= 2 * workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()

#: Bins of the first-level histogram of a strip summary (the top 16 bits of a key).
KEY_BINS = 1 << 16


def master_statistics(writer: MasterWriter, rows: int, workers: int = 1) -> MasterStats:
    """Exact statistics of the image written so far, read back strip by strip.

    The master is N times smaller than its inputs, so this pass is cheap; the median is
    exact (`StripSummary`) without holding the image in memory. A build gathers the same
    statistics while it writes (`combine_into`); this reads them from the file.
    """
    summary = StripSummary(writer.shape)
    for y0, y1 in plan_strips(writer.shape[0], rows):
        summary.add(y0, writer.read_image(y0, y1), writer.read_count(y0, y1))
    return summary.result(writer, rows, workers)


def normalize_in_place(writer: MasterWriter, factor: float, rows: int, workers: int = 1
                       ) -> None:
    """Divide the written image by `factor`, strip by strip on `workers` threads (the flat's
    normalization)."""
    def one(strip: tuple[int, int]) -> None:
        y0, y1 = strip
        writer.rewrite_image(y0, writer.read_image(y0, y1) / np.float32(factor))

    _on_threads(one, _readback_strips(writer, rows), workers, "stacker-norm")
