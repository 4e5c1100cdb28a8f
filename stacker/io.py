"""Reading frames strip by strip, and writing masters atomically.

`StripReader` reads rows ``[y0, y1)`` of N frames into one float32 block with one positioned
read (``os.pread``) per file: a FITS image is stored row by row, so a full-width strip is one
contiguous run of bytes. It keeps no file open between calls (Linux allows 1024 open files,
macOS 256), holds only paths and offsets, and so pickles to cluster workers.

`MasterWriter` preallocates the master's file under a temporary name, takes strips as they
are computed, and renames the file into place only when it is complete. `bintable_bytes`
serializes the small INPUTS table of a master without astropy's table machinery.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import math
import os
import re
import sys
import threading
import urllib.parse
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from stacker.errors import FrameReadError, MemoryBudgetError
from stacker.fitsheader import BLOCK, HeaderCards, end_header, format_card
from stacker.frames import Frame

if TYPE_CHECKING:
    from astropy.io.fits import Header

#: Bytes per input value the engine holds besides the kernel's own work: the float32 block.
#: The raw bytes of one file's strip pass through a per-thread staging buffer (1/N of that).
READ_BYTES_PER_VALUE = 4

#: Bytes per pixel of a strip's results: image (4), frames used (2) and the (2, h, w)
#: float32 pair handed to the store (8), rounded up.
RESULT_BYTES_PER_PIXEL = 16

#: Largest block one strip holds. The kernels read the block once per strip: small enough
#: blocks come back from the L3 cache rather than memory, while each strip costs a read call
#: per frame. Measured on 50 x 4096x4096 frames (one thread, read + mean): 327 rows (256 MB)
#: 1.74-2.0 s, 32-128 rows (26-105 MB) 0.86-1.07 s, 4-8 rows 1.28-1.39 s.
STRIP_CAP = 64 * 2**20
#: `STRIP_CAP` when reading around the page cache: every frame's piece of a strip is one disk
#: request the run waits for, and 8-row pieces of 200 full frames (150 KB) made the disk, not
#: the kernels, the limit: 2 GB, not in the page cache, 33 s; 32 rows (600 KB) 21 s.
DIRECT_STRIP_CAP = 4 * STRIP_CAP

#: Transient bytes per master pixel while a finished master is measured (float64 copies).
STATS_BYTES_PER_PIXEL = 48


def stats_rows(memory_limit: int, width: int) -> int:
    """Rows per strip when a finished master is read back: a quarter of the budget."""
    return max(1, int(memory_limit // (4 * width * STATS_BYTES_PER_PIXEL)))


def plan_strips(ny: int, rows: int) -> list[tuple[int, int]]:
    """Split ``ny`` rows into consecutive strips of at most ``rows`` rows (last one shorter)."""
    if rows < 1:
        raise ValueError(f"rows must be >= 1, got {rows}")
    return [(y0, min(y0 + rows, ny)) for y0 in range(0, ny, rows)]


def pass_rows(nx: int, rows: int, nbytes: int, least: int = 1) -> int:
    """Rows per strip of a pass over one float32 image `nx` wide: about `nbytes` (a
    cache-sized strip, a few MB per thread whatever the budget), at least `least`, and never
    more than the budget's `rows`."""
    return max(1, min(rows, max(least, nbytes // (4 * nx))))


def rows_per_chunk(
    memory_limit: int,
    n_frames: int,
    width: int,
    workers: int,
    bytes_per_value: float,
    *,
    height: int | None = None,
    strip_cap: int | None = STRIP_CAP,
    what: str = "this group",
) -> int:
    """Rows per strip so that `workers` strips in flight stay within `memory_limit`.

    ``rows = floor(memory_limit / (workers * width * (n_frames * bytes_per_value + 16)))``,
    where `bytes_per_value` counts every working copy of one input value (the float32 block,
    whatever the kernel holds per value) and 16 bytes per pixel of the strip are its results
    (image, frames used, the stacked pair Dask stores). The budget is a ceiling, not a
    target: a strip never holds more than `strip_cap` bytes (larger ones only cost page
    faults), and with `height` given every worker gets at least four strips (progress and
    balance); neither ever makes a strip larger than the budget allows.

    Raises
    ------
    MemoryBudgetError
        When the budget cannot hold one row of every frame, with the numbers.
    """
    per_row = workers * width * (n_frames * bytes_per_value + RESULT_BYTES_PER_PIXEL)
    rows = int(memory_limit // per_row)
    if rows < 1:
        need = math.ceil(per_row)
        raise MemoryBudgetError(
            f"memory_limit {_fmt(memory_limit)} cannot hold one row of all {n_frames} frames "
            f"of {what} ({workers} workers x {width} px x ({n_frames} frames x "
            f"{bytes_per_value:g} B + {RESULT_BYTES_PER_PIXEL} B) = {_fmt(need)}); "
            f"raise memory_limit to at least {_fmt(need)} or lower num_workers"
        )
    if strip_cap is not None:
        rows = min(rows, max(1, int(strip_cap // (n_frames * width * bytes_per_value))))
    if height is not None:
        balanced = max(1, math.ceil(height / (4 * workers)))
        rows = min(rows, balanced)
    return rows


def _fmt(n: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


@dataclass(frozen=True)
class StripReader:
    """A lazy (N, ny, nx) view of N frames of one shape, read strip by strip.

    Parameters
    ----------
    frames : sequence of Frame
        Frames of identical shape; plain files are read with ``os.pread``, tile-compressed
        ones through astropy's ``section`` (which decodes only the tiles of the strip).
    direct : bool
        Read the plain files around the page cache (`read_rows_into`).
    """

    frames: tuple[Frame, ...]
    direct: bool = False
    #: Descriptors of the frames' files kept open by `kept_open` (None: each read opens its
    #: file); never pickled into another process's reader.
    fds: tuple[int | None, ...] | None = field(default=None, compare=False, repr=False)
    #: With `fds`, when every frame is camera data (`dtype` uint16) open through the page
    #: cache: the files and where their data start, as arrays for `_read_compiled`.
    table: tuple[np.ndarray, np.ndarray] | None = field(default=None, compare=False,
                                                        repr=False)

    def __post_init__(self) -> None:
        shapes = {f.shape for f in self.frames}
        if len(shapes) != 1:
            raise ValueError(f"frames of different shapes cannot be stacked: {sorted(shapes)}")

    def __getstate__(self) -> dict:
        return {"frames": self.frames, "direct": self.direct, "fds": None, "table": None}

    @contextlib.contextmanager
    def kept_open(self) -> Iterator[StripReader]:
        """This reader with its plain files opened once, for a whole combine, and closed at
        the end. Opening a file took 6 of the ~47 us of reading one frame's piece of a
        strip (200 frames of 4096 px in 19-row strips: 43 000 opens). Around the page
        cache, for compressed files, or when the process may not hold that many more
        files open (`_descriptors`), reads open their file as before."""
        if self.direct:
            yield self
            return
        with _descriptors(len(self.frames)) as granted:
            if not granted:
                yield self
                return
            fds: list[int | None] = []
            try:
                for frame in self.frames:
                    fds.append(None if frame.compressed else _open_or_none(frame.path))
                table = None
                if COMPILED_READS and None not in fds and self.dtype == np.uint16:
                    table = (np.array(fds, np.int32),
                             np.array([f.data_offset for f in self.frames], np.int64))
                yield replace(self, fds=tuple(fds), table=table)
            finally:
                for fd in fds:
                    if fd is not None:
                        os.close(fd)

    def _fd(self, i: int) -> int | None:
        """Frame `i`'s file if `kept_open` holds it open."""
        return None if self.fds is None else self.fds[i]

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(N, ny, nx)``."""
        ny, nx = self.frames[0].shape
        return (len(self.frames), ny, nx)

    @functools.cached_property
    def dtype(self) -> np.dtype:
        """uint16 when every frame is plain camera data (FITS uint16: BITPIX 16, BZERO 32768,
        no BSCALE or BLANK, not compressed), float32 otherwise: the narrowest type that holds
        every physical value exactly (NaN for missing ones)."""
        if all(_is_uint16(f) and not f.compressed and f.blank is None for f in self.frames):
            return np.dtype(np.uint16)
        return np.dtype(np.float32)

    def read(self, y0: int, y1: int, out: np.ndarray | None = None,
             subtract: np.ndarray | None = None,
             scales: np.ndarray | None = None) -> np.ndarray:
        """Rows ``[y0, y1)`` of every frame as ``(N, y1 - y0, nx)``; missing = NaN.

        Float32 unless `out` is given: a uint16 `out` receives the frames' values as they
        are, when `dtype` is uint16.
        """
        n, _, nx = self.shape
        if out is None:
            out = np.empty((n, y1 - y0, nx), dtype=np.float32)
        elif out.dtype != np.float32 and out.dtype != self.dtype:
            raise ValueError(f"these frames cannot be read into {out.dtype}: use {self.dtype}")

        if self.table is not None and self._read_compiled(y0, y1, out, subtract, scales):
            return out

        def read(i: int) -> None:
            read_rows_into(self.frames[i], y0, y1, out[i], subtract,
                           None if scales is None else scales[i], self.direct, self._fd(i))

        # Around the page cache on `DIRECT_THREADS` threads, so that the disk has that many
        # requests to work on.
        if not self.direct or n < 2:
            for i in range(n):
                read(i)
        else:
            list(_direct_pool().map(read, range(n)))
        return out

    def _read_compiled(self, y0: int, y1: int, out: np.ndarray, subtract: np.ndarray | None,
                       scales: np.ndarray | None) -> bool:
        """`read` of camera data from the files `kept_open` holds, every frame in one
        compiled loop (`stacker._fast.read_fits_uint16`, `read_fits_calibrated`): the same
        values, without the Python around each frame's read, and camera data read straight
        into `out` instead of through a staging buffer: 19 rows of 4096 px of a frame in
        ~15 us instead of ~27 (50 frames' 215 strips: 0.16 s instead of 0.29-0.31 s, one
        thread). False when it does not apply or a read failed; the per-frame reads then
        name the file."""
        from stacker import compiled

        n, _, nx = self.shape
        if not out.flags.c_contiguous or out.shape != (n, y1 - y0, nx):
            return False
        fds, offsets, row, step = self._pieces()
        if out.dtype == np.uint16 and subtract is None and scales is None:
            return compiled.read_fits_uint16(fds, offsets, row, y0, step, out) < 0
        if out.dtype != np.float32 or (subtract is not None and not (
                subtract.dtype == np.float32 and subtract.shape == out.shape[1:]
                and subtract.flags.c_contiguous)):
            return False
        factors = (np.ones(n, np.float32) if scales is None
                   else np.ascontiguousarray(scales, dtype=np.float32).reshape(n))
        staging = _staging(step * row).view(np.uint16)
        master = out[0] if subtract is None else subtract
        return compiled.read_fits_calibrated(fds, offsets, row, y0, step, staging, master,
                                             subtract is not None, factors, out) < 0

    def _pieces(self) -> tuple[np.ndarray, np.ndarray, int, int]:
        """For the compiled loops: the open files and their data offsets (`table`), the
        bytes of a row, and the rows of a piece converted while in cache (`STAGING_BYTES`,
        as the per-frame reads)."""
        fds, offsets = self.table
        row = self.frames[0].row_nbytes
        return fds, offsets, row, max(1, STAGING_BYTES // row)

    def add_frames(self, y0: int, y1: int, total: np.ndarray, vmin: np.ndarray,
                   vmax: np.ndarray, extremes: bool) -> bool:
        """Add rows ``[y0, y1)`` of every frame to running sums (`stacker.kernels.
        RunningSums`: int32 `total`, and uint16 `vmin`, `vmax` when `extremes`) in one
        compiled loop over the files `kept_open` holds (`stacker._fast.read_fits_sums`):
        what adding each of `frame_rows` does, without Python around every frame.

        Returns False when it does not apply, or when a read failed: some frames may have
        been added then, so the caller starts again from fresh sums with `frame_rows`,
        whose error names the file.
        """
        from stacker import compiled

        if self.table is None or total.shape != (y1 - y0, self.shape[2]):
            return False
        fds, offsets, row, step = self._pieces()
        staging = _staging(step * row).view(np.uint16)
        return compiled.read_fits_sums(fds, offsets, row, y0, step, staging, total, vmin,
                                       vmax, extremes) < 0

    def frame_rows(self, y0: int, y1: int, dtype=np.uint16,
                   ahead: int | None = None) -> Iterator[np.ndarray]:
        """Rows ``[y0, y1)`` of each frame in turn, as ``(y1 - y0, nx)`` arrays of `dtype`,
        for reductions that take the frames one at a time (running sums).

        An array is valid until the next one is asked for (buffers are reused). Through the
        page cache the frames come in order, read one at a time (the OS reads ahead).
        Around it (`direct`) they come in the order their reads complete, `ahead` reads in
        flight on the reader threads (`STREAM_AHEAD` by default): one at a time, each
        ``O_DIRECT`` read would wait for the disk alone.

        Raises
        ------
        FrameReadError
            The first frame whose rows cannot be read; no read is left writing into a
            buffer when it is raised (or when the caller stops early).
        """
        n, _, nx = self.shape
        ahead = STREAM_AHEAD if ahead is None else ahead
        if not self.direct or n < 2 or ahead < 2:
            rows = np.empty((y1 - y0, nx), dtype)
            for i, frame in enumerate(self.frames):
                read_rows_into(frame, y0, y1, rows, fd=self._fd(i))
                yield rows
            return
        from concurrent.futures import FIRST_COMPLETED, wait

        # Camera data are read into the buffer itself and converted where they lie (no
        # staging copy, and no 16 MiB staging buffer kept by every reader thread).
        k = min(n, ahead)
        if np.dtype(dtype) == np.uint16 and self.dtype == np.uint16:
            size = (y1 - y0) * self.frames[0].row_nbytes + 2 * DIRECT_ALIGN
            buffers = [_aligned(size) for _ in range(k)]

            def read(frame: Frame, buffer: np.ndarray) -> np.ndarray:
                return read_rows_direct(frame, y0, y1, buffer)
        else:
            buffers = [np.empty((y1 - y0, nx), dtype) for _ in range(k)]

            def read(frame: Frame, buffer: np.ndarray) -> np.ndarray:
                read_rows_into(frame, y0, y1, buffer, direct=True)
                return buffer

        pool, todo, pending = _direct_pool(), iter(self.frames), {}

        def start(buffer: np.ndarray) -> None:
            frame = next(todo, None)
            if frame is not None:
                pending[pool.submit(read, frame, buffer)] = buffer

        for buffer in buffers:
            start(buffer)
        try:
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    buffer = pending.pop(future)
                    yield future.result()
                    start(buffer)
        finally:
            for future in pending:
                future.cancel()
            wait(pending)

    def read_frame_rows(self, index: int, rows: Sequence[int]) -> np.ndarray:
        """Selected rows of one frame as float32 ``(len(rows), nx)`` (for sampled statistics)."""
        frame = self.frames[index]
        out = np.empty((len(rows), frame.shape[1]), dtype=np.float32)
        # One open for all the runs (a sample is ~64 single rows: 64 opens took a third of
        # reading them).
        _named_errors(frame, _read_rows_into, frame, list(_runs(rows)), out, None, None)
        return out

    def row_ranges(self, index: int, rows: Sequence[int]) -> tuple[Path, list[tuple[int, int]]]:
        """Where `read_frame_rows` reads: the file and the (offset, length) of each run of
        rows (none for a compressed file, which astropy decodes)."""
        frame = self.frames[index]
        if frame.compressed:
            return frame.path, []
        row = frame.row_nbytes
        return frame.path, [(frame.data_offset + y0 * row, (y1 - y0) * row)
                            for y0, y1 in _runs(rows)]


class ReadAhead:
    """Keep the OS reading the next items' bytes while the current ones are worked on.

    Sampling a few rows of every frame is a string of small reads scattered over each file,
    which the OS cannot guess: each worker waits for one at a time. Here one thread asks the
    OS for each item's byte ranges in order (``posix_fadvise`` WILLNEED: start reading, do
    not wait), at most `ahead` items beyond the last one a worker has `started`, so the disk
    gets them together. 200 full frames, 2 GB, quality control, not in the page cache: 22.2
    -> 17.8 s. The pages go to the page cache, which the OS reclaims, not to this process.

    Where the OS has no ``posix_fadvise`` (macOS, Windows) this does nothing.

    Parameters
    ----------
    items : sequence of (path, list of (offset, length))
        Each item's file and byte ranges, in the order the workers take the items.
    ahead : int
        Items that may be asked for beyond the last one started (the first `ahead` at once).
    """

    def __init__(self, items: Sequence[tuple[Path, list[tuple[int, int]]]], ahead: int) -> None:
        self._items = items
        self._permits = threading.Semaphore(max(1, ahead))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if hasattr(os, "posix_fadvise") and len(items) > 0:
            self._thread = threading.Thread(target=self._run, name="stacker-readahead",
                                            daemon=True)

    def __enter__(self) -> ReadAhead:
        if self._thread is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._permits.release()  # wakes the thread if it waits for a permit
        if self._thread is not None:
            self._thread.join()

    def started(self) -> None:
        """A worker has started an item: one more may be asked for."""
        self._permits.release()

    def _run(self) -> None:
        for path, ranges in self._items:
            self._permits.acquire()
            if self._stop.is_set():
                return
            if ranges:
                _advise(path, ranges)


def _advise(path: Path, ranges: list[tuple[int, int]]) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # the read itself reports the file
    try:
        for offset, length in ranges:
            os.posix_fadvise(fd, offset, length, os.POSIX_FADV_WILLNEED)
    except OSError:
        pass  # only a hint
    finally:
        os.close(fd)


def _runs(rows: Sequence[int]) -> Iterator[tuple[int, int]]:
    """Consecutive runs of sorted row indices as ``[y0, y1)`` pairs (fewer, larger reads)."""
    rows = sorted(rows)
    start = prev = rows[0]
    for r in rows[1:]:
        if r != prev + 1:
            yield start, prev + 1
            start = r
        prev = r
    yield start, prev + 1


def read_rows_into(frame: Frame, y0: int, y1: int, out: np.ndarray,
                   subtract: np.ndarray | None = None, scale: float | None = None,
                   direct: bool = False, fd: int | None = None) -> None:
    """Read rows ``[y0, y1)`` of `frame` into the float32 array `out` ``(y1 - y0, nx)``.

    With `direct`, a plain file is read around the page cache (``O_DIRECT``, where the OS
    and file system have it; `exceeds_page_cache` says when that pays).

    With `subtract` (float32 rows of a master, the shape of `out`) and/or `scale`, `out`
    gets ``(value - subtract) * scale``, with the float32 rounding of those two numpy
    operations, applied to each piece as it is read (camera data: in the conversion's own
    pass), instead of two more passes over the rows.

    Raises
    ------
    FrameReadError
        Naming the frame, when its bytes cannot be read or decoded.
    """
    _named_errors(frame, _read_rows_into, frame, [(y0, y1)], out, subtract,
                  None if scale is None else np.float32(scale), direct, fd)


def _named_errors(frame: Frame, fn: Callable, *args) -> None:
    """``fn(*args)``, reading `frame`: any failure to read or decode it becomes a
    FrameReadError naming it."""
    try:
        fn(*args)
    except FrameReadError:
        raise
    except OSError as exc:
        raise FrameReadError(frame.path, f"cannot be read ({exc.strerror or exc})") from exc
    except Exception as exc:
        # astropy's tile decompression raises ValueError, TypeError, zlib.error, ... on
        # damaged tiles: whatever it is, this file's pixels are unusable.
        if not frame.compressed:
            raise
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:120]
        raise FrameReadError(frame.path, f"cannot be decompressed ({first})") from exc


def _read_rows_into(frame: Frame, runs: Sequence[tuple[int, int]], out: np.ndarray,
                    subtract: np.ndarray | None, scale: np.float32 | None,
                    direct: bool = False, fd: int | None = None) -> None:
    """Rows ``[y0, y1)`` of each of `runs`, one after the other, into `out` (and
    `subtract`'s rows, the same), the file opened once (or read through `fd`, the file
    open for reading through the page cache, left open)."""
    if frame.compressed:
        pos = 0
        for y0, y1 in runs:
            out[pos : pos + y1 - y0] = _read_compressed(frame, y0, y1)
            pos += y1 - y0
        _calibrate(out, subtract, scale)
        return
    nx, row = frame.shape[1], frame.row_nbytes
    # Converted in pieces that stay in the core's cache: one pass over a whole tall strip
    # would send every byte to memory and back (2.9x slower at 327 rows of 4096 px than in
    # pieces of 64).
    step = max(1, STAGING_BYTES // row)
    given = fd is not None and not direct
    fd, aligned = (fd, False) if given else _open_rows(frame.path, direct)
    # Around the page cache, each read is a request the worker waits for: fewer, larger ones.
    chunk = max(step, DIRECT_BYTES // row // step * step) if aligned else step
    try:
        n_rows = sum(y1 - y0 for y0, y1 in runs)
        if len(runs) > 1 and not aligned and n_rows * row <= STAGING_BYTES:
            # A sample's scattered rows: read side by side and converted in one call, not
            # one call per row (64 a frame, each taking the GIL back between reads).
            buf = _staging(n_rows * row)
            pos = 0
            for y0, y1 in runs:
                part = buf[pos * row : (pos + y1 - y0) * row]
                if os.preadv(fd, [part], frame.data_offset + y0 * row) != part.size:
                    raise FrameReadError(frame.path, SHORT_FILE)
                pos += y1 - y0
            raw = buf[: n_rows * row].view(frame.stored_dtype).reshape(n_rows, nx)
            _to_physical(frame, raw, out, subtract, scale)
            return
        pos = 0
        for y0, y1 in runs:
            for a in range(y0, y1, chunk):
                b = min(a + chunk, y1)
                if aligned:
                    buf, complete = _read_aligned(fd, frame.data_offset + a * row,
                                                  (b - a) * row)
                else:
                    buf = _staging((b - a) * row)
                    complete = os.preadv(fd, [buf], frame.data_offset + a * row) == buf.size
                if not complete:
                    raise FrameReadError(frame.path, SHORT_FILE)
                for c in range(a, b, step):
                    d = min(c + step, b)
                    raw = buf[(c - a) * row : (d - a) * row].view(frame.stored_dtype)
                    at = slice(pos + c - y0, pos + d - y0)
                    _to_physical(frame, raw.reshape(d - c, nx), out[at],
                                 None if subtract is None else subtract[at], scale)
            pos += y1 - y0
    finally:
        if not given:
            os.close(fd)


#: Largest read when reading around the page cache (``O_DIRECT``): a piece of `read_rows_into`,
#: and the most of one frame a streaming strip reads (`stream_rows`). Each read is a request
#: the disk serves alone: 16 MiB pieces of 200 full frames (24 GB) on 8 threads took
#: 10.7-11.6 s here, 4 MiB pieces 16.2 s. Read alone, taller pieces went faster still
#: (strips of 799 / 954 / 1597 / 3194 rows, 15 / 18 / 31 / 61 MB a frame: 10.5 / 10.1-10.2 /
#: 9.1-9.8 / 8.5-9.3 s), but in a whole mean 31 MB pieces 2 at a time took 12.9-13.4 s and
#: 700 MB, 16 MiB pieces 4 at a time 12.2-12.6 s and 450-470 MB. A block's strips are
#: shorter than this.
DIRECT_BYTES = 16 * 2**20
#: Alignment of ``O_DIRECT`` offsets, lengths and buffers (the largest logical block size).
DIRECT_ALIGN = 4096


#: Whether `StripReader.kept_open` readers read camera data in one compiled loop per strip
#: (`StripReader._read_compiled`): where the C library's ``pread`` is (as ``os.preadv``)
#: and takes the 64-bit offsets the compiled loop passes (a 64-bit process).
COMPILED_READS = hasattr(os, "preadv") and sys.maxsize > 2**32

#: Open files `StripReader.kept_open` leaves to everything else in the process (Dask,
#: the master being written, sockets of a cluster worker, astropy).
FD_RESERVE = 128
#: The most open files stacker asks the system for (`_fd_budget`): 1000 frames kept open
#: by two masters at once, with room to spare.
FD_WANTED = 4096
#: Where there is no ``resource`` module (Windows: the C library allows 512 open files),
#: the files all `kept_open` readers together may hold.
FD_BUDGET_DEFAULT = 256

_fd_lock = threading.Lock()
_fd_state = {"budget": None, "held": 0}


def _fd_budget() -> int:
    """How many files `kept_open` readers may hold open at once, together: the process's
    limit on open files less `FD_RESERVE`.

    The soft limit is raised towards the hard one first (up to `FD_WANTED`), once per
    process: it is 1024 on most Linux desktops and 256 on macOS, while their hard limits
    allow far more, and a set of 300 frames kept open reads in one compiled loop per strip
    instead of one read call per frame.
    """
    try:
        import resource
    except ImportError:
        return FD_BUDGET_DEFAULT
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    cap = FD_WANTED if hard == resource.RLIM_INFINITY else min(hard, FD_WANTED)
    if soft != resource.RLIM_INFINITY and soft < cap:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (cap, hard))
            soft = cap
        except (ValueError, OSError):  # a sandbox may refuse: keep what there is
            pass
    limit = FD_WANTED if soft == resource.RLIM_INFINITY else soft
    return max(0, limit - FD_RESERVE)


@contextlib.contextmanager
def _descriptors(n: int) -> Iterator[bool]:
    """Whether `n` more files may be kept open now (`_fd_budget`, shared by every reader of
    the process: a worker with several threads builds several masters at once); they count
    against the budget until the block ends."""
    with _fd_lock:
        if _fd_state["budget"] is None:
            _fd_state["budget"] = _fd_budget()
        granted = _fd_state["held"] + n <= _fd_state["budget"]
        if granted:
            _fd_state["held"] += n
    try:
        yield granted
    finally:
        if granted:
            with _fd_lock:
                _fd_state["held"] -= n


#: Reads in flight when reading around the page cache: each waits for the disk (no read-ahead
#: there), so a strip's files are read in parallel.
DIRECT_THREADS = 8
_pool_lock = threading.Lock()


def _direct_pool():
    """The process's pool of `DIRECT_THREADS` reader threads, started on first use."""
    global _DIRECT_POOL
    with _pool_lock:
        if _DIRECT_POOL is None:
            from concurrent.futures import ThreadPoolExecutor

            _DIRECT_POOL = ThreadPoolExecutor(DIRECT_THREADS, thread_name_prefix="stacker-read")
        return _DIRECT_POOL


_DIRECT_POOL = None


#: Reads in flight per worker of the streaming reductions around the page cache
#: (`StripReader.frame_rows`).
STREAM_AHEAD = 4


def stream_rows(memory_limit: int | None, shape: tuple[int, int], workers: int,
                direct: bool, what: str = "this group") -> int:
    """Rows per strip of the streaming reductions (mean and one-value min/max of camera
    data: running sums, one frame's uint16 rows at a time), whatever the number of frames.

    Through the page cache, strips of `STREAM_BYTES` per worker: the OS reads ahead, and
    small strips stay in the core's cache. Around it (`direct`), each frame's piece of a
    strip is one read the disk serves alone, so strips are as tall as the budget allows, up
    to `DIRECT_BYTES` of a frame. Either way every worker gets four strips or more
    (balance, progress), and the budget holds the strips in flight. Per pixel: the running
    sums (8 bytes), the results (16, as for every strip) and the frame's rows of each read
    (2, one read at a time through the cache, `STREAM_AHEAD` around it). `memory_limit`
    None: no budget.

    Raises
    ------
    MemoryBudgetError
        When `memory_limit` cannot hold one row of running sums per worker.
    """
    ny, nx = shape
    per_pixel = STREAM_SUM_BYTES + 2 * (STREAM_AHEAD if direct else 1) + RESULT_BYTES_PER_PIXEL
    per_row = workers * nx * per_pixel
    budget = ny if memory_limit is None else int(memory_limit // per_row)
    if budget < 1:
        raise MemoryBudgetError(
            f"memory_limit {_fmt(memory_limit)} cannot hold one row of the running sums of "
            f"{what} ({workers} workers x {nx} px x {per_pixel} B = "
            f"{_fmt(per_row)}); raise memory_limit to at least {_fmt(per_row)} or lower "
            "num_workers")
    balanced = -(-ny // (4 * workers))  # every worker gets strips; progress moves
    cap = DIRECT_BYTES // (2 * nx) if direct else \
        STREAM_BYTES // (nx * STREAM_BYTES_PER_PIXEL)
    return max(1, min(budget, cap, balanced))


#: Bytes of running sums and one frame's rows per streaming strip through the page cache
#: (102 rows of 4096 px): 2, 4 and 8 MiB took 1.18, 0.95 and 0.91 s for 200 frames of
#: 4096x4096 on two threads.
STREAM_BYTES = 4096 * 1024
#: int32 total, uint16 min and max.
STREAM_SUM_BYTES = 8
#: The sums and the frame's uint16 rows.
STREAM_BYTES_PER_PIXEL = STREAM_SUM_BYTES + 2


def _open_direct(path: Path) -> int | None:
    """`path` opened for reads that bypass the page cache, or None where that is not
    available (no ``O_DIRECT``: macOS, Windows; or a file system without it, e.g. tmpfs)."""
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return None
    try:
        return os.open(path, os.O_RDONLY | flag)
    except OSError as exc:
        if exc.errno == errno.EINVAL:
            return None
        raise


def read_rows_direct(frame: Frame, y0: int, y1: int, buffer: np.ndarray) -> np.ndarray:
    """Rows ``[y0, y1)`` of plain camera data (FITS uint16: int16 + BZERO 32768) as uint16,
    read around the page cache into `buffer` (bytes aligned to `DIRECT_ALIGN`, at least the
    rows' bytes plus two blocks) and converted where they lie. Returns the view of `buffer`
    that holds them.

    Raises
    ------
    FrameReadError
        Naming the frame, when its bytes cannot be read.
    """
    from stacker.compiled import uint16_from_fits

    row = frame.row_nbytes
    try:
        # Without O_DIRECT the same aligned blocks, through the cache.
        fd, _ = _open_rows(frame.path, direct=True)
        try:
            raw, complete = _read_aligned(fd, frame.data_offset + y0 * row, (y1 - y0) * row,
                                          buffer)
        finally:
            os.close(fd)
    except OSError as exc:
        raise FrameReadError(frame.path, f"cannot be read ({exc.strerror or exc})") from exc
    if not complete:
        raise FrameReadError(frame.path, SHORT_FILE)
    words = raw.view(np.uint16).reshape(y1 - y0, frame.shape[1])
    uint16_from_fits(words, words)  # element by element: in place is safe
    return words


#: Why a frame's rows cannot all be read.
SHORT_FILE = "file is shorter than its header says (truncated since it was scanned?)"


def _open_or_none(path: Path) -> int | None:
    """`path` opened for reading, or None when it cannot be: its reads then open it
    themselves and fail with the error that names it (`read_rows_into`)."""
    try:
        return os.open(path, os.O_RDONLY)
    except OSError:
        return None


def _open_rows(path: Path, direct: bool) -> tuple[int, bool]:
    """`path` opened for reading rows: around the page cache when `direct` and the system
    allows it (`_open_direct`), else through it; and whether it is the former (reads must
    then be aligned, `_read_aligned`)."""
    fd = _open_direct(path) if direct else None
    if fd is not None:
        return fd, True
    return os.open(path, os.O_RDONLY), False


def _aligned(nbytes: int, align: int = DIRECT_ALIGN) -> np.ndarray:
    """A fresh byte buffer starting at a multiple of `align`."""
    raw = np.empty(nbytes + align - 1, np.uint8)
    return raw[(-raw.ctypes.data) % align :][:nbytes]


def _read_aligned(fd: int, offset: int, nbytes: int,
                  buffer: np.ndarray | None = None) -> tuple[np.ndarray, bool]:
    """Bytes ``[offset, offset + nbytes)`` of an ``O_DIRECT`` file: the aligned blocks around
    them are read into `buffer` (aligned, the bytes plus two blocks) or an aligned per-thread
    buffer. Returns (bytes, all of them read)."""
    start = offset - offset % DIRECT_ALIGN
    stop = -(-(offset + nbytes) // DIRECT_ALIGN) * DIRECT_ALIGN
    buf = _staging(stop - start, DIRECT_ALIGN) if buffer is None else buffer[: stop - start]
    got = os.preadv(fd, [buf], start)
    head = offset - start
    return buf[head : head + nbytes], got >= head + nbytes


def exceeds_page_cache(nbytes: int) -> bool:
    """Whether reading `nbytes` of frames should bypass the page cache (``O_DIRECT``): when
    they are more than half the memory the OS could give its page cache (MemAvailable).

    A run reads every input byte once, strip by strip across all frames. Pages read once
    wait on Linux's inactive list, about half of the cache, for a second use; a larger set
    pushes its own first strips out before it reaches the last, so a rerun finds little of
    it, and filling the cache while reclaiming it costs the kernel CPU the kernels need:
    reading 200 full frames (24 GB, 24 GB machine, 2 cores) through the page cache took
    15.8 s of system time against 1.3 s around it, and 21.6 against 13.7 s of wall time
    (``dd``); their sigma clip 27-44 against 21-28 s. A set well within memory is read
    through the cache, which costs nothing more on a first run (200 frames of 4096x4096,
    6.7 GB: 6.1-7.1 s either way) and is faster on a rerun that finds it there (5.6 against
    6.5 s). The boundary is a judgement: from half of MemAvailable on, the first run's cost
    is certain and the rerun's gain is not.
    """
    available = _memory_available()
    return available is not None and nbytes > available // 2


def _memory_available() -> int | None:
    """MemAvailable of /proc/meminfo in bytes (Linux), else None."""
    try:
        with open("/proc/meminfo", "rb") as fh:
            for line in fh:
                if line.startswith(b"MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


_local = threading.local()

#: Bytes of file read at a time: half of this machine's 1 MiB L2 per core (read + convert).
STAGING_BYTES = 512 * 1024


def _staging(nbytes: int, align: int = 1) -> np.ndarray:
    """A per-thread byte buffer reused across reads, starting at a multiple of `align`
    (``O_DIRECT``): `os.pread` would allocate (and fault in) a fresh buffer for every strip
    of every file. One buffer per alignment, as a thread uses both kinds of read."""
    name = f"buf{align}"
    buf = getattr(_local, name, None)
    if buf is None or buf.size < nbytes:
        buf = _aligned(nbytes, align)
        setattr(_local, name, buf)
    return buf[:nbytes]


def _is_uint16(frame: Frame) -> bool:
    return frame.bitpix == 16 and frame.bscale == 1.0 and frame.bzero == 32768.0


def _calibrate(out: np.ndarray, subtract: np.ndarray | None,
               scale: np.float32 | None) -> None:
    if subtract is not None:
        out -= subtract
    if scale is not None:
        out *= scale


def _to_physical(frame: Frame, raw: np.ndarray, out: np.ndarray,
                 subtract: np.ndarray | None = None, scale: np.float32 | None = None) -> None:
    """Physical values of the stored `raw` rows into `out`, minus `subtract`, times `scale`
    (`read_rows_into`)."""
    calibrated = subtract is not None or scale is not None
    if (calibrated and _is_uint16(frame) and frame.blank is None and out.dtype == np.float32
            and (subtract is None or (subtract.dtype == np.float32
                                      and subtract.shape == out.shape))):
        # Camera data with a master and/or a scale: all of it in the conversion's one pass.
        from stacker.compiled import uint16_calibrated

        uint16_calibrated(raw.view(np.uint16), out if subtract is None else subtract,
                          subtract is not None, np.float32(1) if scale is None else scale,
                          out)
        return
    if _is_uint16(frame):
        # uint16 stored as int16 + 32768 (every CMOS camera): swapping the bytes and flipping
        # the sign bit gives the value exactly; one compiled pass that releases the GIL.
        from stacker.compiled import uint16_from_fits

        uint16_from_fits(raw.view(np.uint16), out)
    elif frame.bscale == 1.0 and frame.bzero == 0.0:
        out[...] = raw
    else:
        out[...] = raw.astype(np.float64) * frame.bscale + frame.bzero
    if frame.blank is not None:
        out[raw == frame.blank] = np.nan
    if frame.bitpix < 0:
        # inf is as unusable as NaN: one masking convention for the kernels.
        out[~np.isfinite(out)] = np.nan
    if calibrated:
        _calibrate(out, subtract, scale)


def _read_compressed(frame: Frame, y0: int, y1: int) -> np.ndarray:
    from astropy.io import fits

    with fits.open(frame.path, memmap=False) as hdul:
        data = hdul[frame.hdu_index].section[y0:y1, :]
    data = np.asarray(data, dtype=np.float32)
    data[~np.isfinite(data)] = np.nan
    return data


# --------------------------------------------------------------------------------------------
# Writing


def _padded(n: int) -> int:
    return -(-n // BLOCK) * BLOCK


@dataclass(frozen=True)
class MasterWriter:
    """Writes one master: a float32 image HDU and an int16 HDU of frames used per pixel.

    The file is laid out at construction under ``.<name>.part`` in the output folder (sparse,
    so nothing is written twice), strips land with ``os.pwrite`` at their offsets, statistics
    cards reserved in the header are filled in place, and `commit` renames the file into
    place. Only paths and offsets are held, so a writer pickles to other processes.
    """

    final_path: Path
    temp_path: Path
    shape: tuple[int, int]
    image_offset: int
    count_offset: int
    #: (keyword, byte offset of its card, comment) of the primary header's cards
    header_cards: tuple[tuple[str, int, str], ...]

    @classmethod
    def create(
        cls,
        final_path: Path,
        shape: tuple[int, int],
        header: HeaderCards | Header,
        count_header: HeaderCards | Header,
        extensions: bytes = b"",
    ) -> MasterWriter:
        """Lay out the file: headers, preallocated data, then `extensions` as they are.

        `extensions` are complete extension HDUs, padded to FITS records (the inputs table
        from `bintable_bytes`).
        """
        if len(extensions) % BLOCK:
            raise ValueError(f"extensions must be whole {BLOCK}-byte records, "
                             f"got {len(extensions)} bytes")
        ny, nx = shape
        head0 = image_header_bytes(header, shape, bitpix=-32, primary=True)
        head1 = image_header_bytes(count_header, shape, bitpix=16, primary=False)
        image_offset = len(head0)
        count_header_offset = image_offset + _padded(ny * nx * 4)
        count_offset = count_header_offset + len(head1)
        end = count_offset + _padded(ny * nx * 2)
        temp = final_path.with_name(f".{final_path.name}.part")
        try:
            with open(temp, "wb") as fh:
                fh.write(head0)
                fh.seek(count_header_offset)
                fh.write(head1)
                fh.truncate(end)  # sparse data: zeros read back until strips arrive
                fh.seek(end)
                fh.write(extensions)
        except BaseException:
            temp.unlink(missing_ok=True)  # a full disk here leaves nothing behind
            raise
        comments = {key: comment for key, _, comment in _triples(header)}
        cards = tuple((key, offset, comments.get(key, ""))
                      for key, offset in _card_offsets(head0))
        return cls(final_path, temp, shape, image_offset, count_offset, cards)

    def write(self, y0: int, image: np.ndarray, count: np.ndarray) -> None:
        """Write a strip of the image and of the frames-used map starting at row `y0`."""
        nx = self.shape[1]
        fd = os.open(self.temp_path, os.O_WRONLY)
        try:
            _pwrite_all(fd, np.ascontiguousarray(image, dtype=">f4"),
                        self.image_offset + y0 * nx * 4)
            _pwrite_all(fd, np.ascontiguousarray(count, dtype=">i2"),
                        self.count_offset + y0 * nx * 2)
        finally:
            os.close(fd)

    def __setitem__(self, region: tuple[slice, ...], value: np.ndarray) -> None:
        """`dask.array.store` target: `value` is ``(2, h, nx)`` = image and count planes."""
        rows = region[1]
        self.write(rows.start or 0, value[0], value[1])

    def read_image(self, y0: int, y1: int) -> np.ndarray:
        """Rows of the image written so far, as float32 (for statistics and normalization)."""
        nx = self.shape[1]
        with open(self.temp_path, "rb") as fh:
            fh.seek(self.image_offset + y0 * nx * 4)
            data = fh.read((y1 - y0) * nx * 4)
        return np.frombuffer(data, dtype=">f4").reshape(y1 - y0, nx).astype(np.float32)

    def read_image_words(self, y0: int, y1: int, out: np.ndarray) -> np.ndarray:
        """Rows of the image as the file holds them (big-endian float32) in the uint32 array
        `out` (``(y1 - y0) * nx`` words), without conversion: for passes that decode the
        bytes themselves."""
        nx = self.shape[1]
        if out.dtype != np.uint32 or out.size != (y1 - y0) * nx:
            raise ValueError(f"out must be {(y1 - y0) * nx} uint32 words, got {out.size} "
                             f"{out.dtype}")
        fd = os.open(self.temp_path, os.O_RDONLY)
        try:
            got = os.preadv(fd, [out], self.image_offset + y0 * nx * 4)
        finally:
            os.close(fd)
        if got != out.nbytes:
            raise OSError(f"{self.temp_path}: image rows {y0}-{y1} are beyond its end")
        return out

    def read_count(self, y0: int, y1: int) -> np.ndarray:
        """Rows of the frames-used map written so far."""
        nx = self.shape[1]
        with open(self.temp_path, "rb") as fh:
            fh.seek(self.count_offset + y0 * nx * 2)
            data = fh.read((y1 - y0) * nx * 2)
        return np.frombuffer(data, dtype=">i2").reshape(y1 - y0, nx).astype(np.int32)

    def rewrite_image(self, y0: int, image: np.ndarray) -> None:
        """Replace image rows from `y0` (used to normalize a flat in place)."""
        fd = os.open(self.temp_path, os.O_WRONLY)
        try:
            _pwrite_all(fd, np.ascontiguousarray(image, dtype=">f4"),
                        self.image_offset + y0 * self.shape[1] * 4)
        finally:
            os.close(fd)

    def set_cards(self, values: dict[str, object]) -> None:
        """Fill reserved header cards in place (same 80-byte slot, so nothing moves)."""
        slots = {key: (offset, comment) for key, offset, comment in self.header_cards}
        fd = os.open(self.temp_path, os.O_RDWR)
        try:
            for key, value in values.items():
                if key not in slots:
                    raise KeyError(f"header card {key} was not reserved")
                offset, comment = slots[key]
                card = format_card(key, value, comment)
                if len(card) != 80:
                    raise ValueError(f"header card {key} = {value!r} does not fit its slot")
                _pwrite_all(fd, card.encode("ascii"), offset)
        finally:
            os.close(fd)

    def sync(self) -> None:
        """Flush the unfinished file to disk (`commit` does; done before, the file can be
        read meanwhile under `temp_path`, and `commit` has nothing left to flush)."""
        fd = os.open(self.temp_path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def commit(self) -> Path:
        """Flush to disk and rename into place; the master now exists, complete."""
        self.sync()
        os.replace(self.temp_path, self.final_path)
        return self.final_path

    def abort(self) -> None:
        """Remove the unfinished file: a master is complete on disk or absent."""
        self.temp_path.unlink(missing_ok=True)


def image_header_bytes(
    cards: HeaderCards | Header | Iterable[tuple[str, object, str]],
    shape: tuple[int, ...],
    *,
    bitpix: int,
    primary: bool,
    extend: bool = True,
) -> bytes:
    """The padded bytes of an image HDU header: the structural keywords first, as astropy
    writes them, then `cards` (``(keyword, value, comment)``; structural ones are skipped).

    Parameters
    ----------
    cards : HeaderCards, astropy.io.fits.Header or iterable of (str, object, str)
        ``(keyword, value, comment)`` of the cards.
    shape : tuple of int
        ``(NAXIS2, NAXIS1)``; ``()`` for a primary HDU without data.
    bitpix : int
        ``BITPIX`` of the data.
    primary : bool
        A primary HDU (``SIMPLE``, ``EXTEND``) or an image extension (``XTENSION``,
        ``PCOUNT``, ``GCOUNT``).
    extend : bool
        Write ``EXTEND = T`` in a primary header (astropy leaves it out of a single-HDU file
        whose header did not have it, such as the bad-pixel mask).
    """
    if primary:
        head = [("SIMPLE", True, "conforms to FITS standard")]
    else:
        head = [("XTENSION", "IMAGE", "Image extension")]
    head += [("BITPIX", bitpix, "array data type"),
             ("NAXIS", len(shape), "number of array dimensions")]
    head += [(f"NAXIS{i}", n, "") for i, n in enumerate(reversed(shape), 1)]
    if primary:
        if extend:
            head.append(("EXTEND", True, ""))
    else:
        head += [("PCOUNT", 0, "number of parameters"), ("GCOUNT", 1, "number of groups")]
    text = "".join(format_card(*card) for card in head)
    if hasattr(cards, "cards"):
        # An astropy Header (a master copied into one file) keeps astropy's own images.
        with warnings.catch_warnings():
            # A long value (a file name) shortens its comment; the value itself is kept whole.
            warnings.simplefilter("ignore")
            text += "".join(c.image for c in cards.cards if c.keyword not in _STRUCTURAL)
    else:
        text += "".join(format_card(*c) for c in cards if c[0] not in _STRUCTURAL)
    return end_header(text).encode("ascii")


def _triples(cards) -> list[tuple[str, object, str]]:
    """``(keyword, value, comment)`` of a `HeaderCards`, an astropy Header or such triples."""
    if hasattr(cards, "cards"):  # an astropy Header
        return [(c.keyword, c.value, c.comment) for c in cards.cards]
    return list(cards)


_STRUCTURAL = {"SIMPLE", "XTENSION", "BITPIX", "NAXIS", "NAXIS1", "NAXIS2", "EXTEND",
               "PCOUNT", "GCOUNT", "BZERO", "BSCALE"}


@dataclass(frozen=True)
class TableColumn:
    """One column of a FITS binary table.

    Parameters
    ----------
    name : str
        ``TTYPEn``.
    format : str
        ``TFORMn``: ``"D"`` (float64) or ``"rA"`` (ASCII text of ``r`` bytes).
    values : sequence of float or of str
        One value per row; text must be printable ASCII (see `fits_ascii`).
    """

    name: str
    format: str
    values: Sequence[float] | Sequence[str]


def bintable_bytes(columns: Sequence[TableColumn], extname: str) -> bytes:
    """Serialize a binary table extension (XTENSION='BINTABLE'), ready to follow other HDUs.

    The header has the mandatory keywords in the standard's order (as astropy writes them),
    then ``TTYPEn``/``TFORMn`` per column and ``EXTNAME``; rows are packed big-endian with
    no gaps. Header and data are each padded to 2880-byte records, the header with spaces
    and the data with zero bytes. Text shorter than its field is padded with NUL bytes (the
    standard's terminator; readers such as astropy strip it) and longer text is cut to the
    field, as ``astropy.io.fits.BinTableHDU.from_columns`` does; the bytes are the same as
    that writer's for these formats. Building the table this way never imports
    ``astropy.table`` (~0.15 s of every run).

    Parameters
    ----------
    columns : sequence of TableColumn
        The columns, all with the same number of values.
    extname : str
        ``EXTNAME`` of the extension.

    Returns
    -------
    bytes
        The extension HDU, a whole number of 2880-byte records.

    Raises
    ------
    ValueError
        For an unsupported format, columns of different lengths, or text that is not
        printable ASCII (naming the column, the row and the value).
    """
    rows = {len(c.values) for c in columns}
    if len(rows) > 1:
        raise ValueError(f"columns of different lengths: "
                         f"{ {c.name: len(c.values) for c in columns} }")
    nrows = rows.pop() if rows else 0
    fields = [(c.name, _tform_dtype(c)) for c in columns]
    table = np.zeros(nrows, dtype=np.dtype(fields))
    for c in columns:
        if c.format.endswith("A"):
            table[c.name] = [_ascii_bytes(c.name, i, v) for i, v in enumerate(c.values)]
        else:
            table[c.name] = np.asarray(c.values, dtype=np.float64)
    cards = [("XTENSION", "BINTABLE", "binary table extension"),
             ("BITPIX", 8, "array data type"),
             ("NAXIS", 2, "number of array dimensions"),
             ("NAXIS1", table.dtype.itemsize, "length of dimension 1"),
             ("NAXIS2", nrows, "length of dimension 2"),
             ("PCOUNT", 0, "number of group parameters"),
             ("GCOUNT", 1, "number of groups"),
             ("TFIELDS", len(columns), "number of table fields")]
    for n, c in enumerate(columns, 1):
        cards += [(f"TTYPE{n}", c.name, ""), (f"TFORM{n}", c.format, "")]
    cards.append(("EXTNAME", extname, "extension name"))
    header = end_header("".join(format_card(*card) for card in cards))
    data = table.tobytes()
    return header.encode("ascii") + data + bytes(_padded(len(data)) - len(data))


_TFORM = re.compile(r"(\d*)([AD])")


def _tform_dtype(column: TableColumn) -> str:
    match = _TFORM.fullmatch(column.format)
    repeat = int(match.group(1) or 1) if match else 0
    if match is None or repeat < 1 or (match.group(2) == "D" and repeat != 1):
        raise ValueError(f"column {column.name}: unsupported format {column.format!r} "
                         "(only 'D' and 'rA' with r >= 1)")
    return f"S{repeat}" if match.group(2) == "A" else ">f8"


def _ascii_bytes(column: str, row: int, text: str) -> bytes:
    if not (text.isascii() and text.isprintable()):
        raise ValueError(f"column {column}, row {row}: {text!r} is not printable ASCII "
                         "(FITS 'A' fields hold ASCII text; see fits_ascii)")
    return text.encode("ascii")


#: Printable ASCII that `fits_ascii` keeps as it is: everything but '%', its escape character.
_KEPT = "".join(chr(c) for c in range(0x20, 0x7F) if chr(c) != "%")


def fits_ascii(text: str) -> str:
    """`text` as printable ASCII for a FITS string: other bytes percent-encoded (RFC 3986).

    FITS header values and binary-table ``A`` fields hold ASCII text only (FITS 4.0,
    sections 4.2.1 and 7.3.3.1), and trailing spaces are not significant there (astropy
    strips them on reading). File names, though, can hold any character. Rather than
    refuse such a file (a master's provenance is no reason to fail the master), every byte
    of its file-system encoding (UTF-8, or the raw bytes of an undecodable name) outside
    printable ASCII, every ``%`` and any trailing space is written ``%XX``, as in a
    ``file:`` URL. The rule loses nothing and leaves ordinary paths as they are:
    ``os.fsdecode(urllib.parse.unquote_to_bytes(value))`` gives the original back.

    Examples
    --------
    >>> fits_ascii("/data/données/dark 1.fits")
    '/data/donn%C3%A9es/dark 1.fits'
    >>> fits_ascii("/data/100%.fits ")
    '/data/100%25.fits%20'
    """
    if text.isascii() and text.isprintable() and "%" not in text and not text.endswith(" "):
        return text
    raw = os.fsencode(text)
    body = raw.rstrip(b" ")
    return (urllib.parse.quote_from_bytes(body, safe=_KEPT)
            + "%20" * (len(raw) - len(body)))


def _pwrite_all(fd: int, data: bytes | np.ndarray, offset: int) -> None:
    """Write all of `data` (bytes or a C-contiguous array, written as it is in memory)."""
    view = memoryview(data)
    if not view.nbytes:
        return
    view = view.cast("B")  # slices count bytes, as pwrite does
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


def _card_offsets(header_bytes: bytes) -> Iterator[tuple[str, int]]:
    for pos in range(0, len(header_bytes), 80):
        key = header_bytes[pos : pos + 8].decode("ascii").strip()
        if key == "END":
            return
        if key and key not in ("HISTORY", "COMMENT", "CONTINUE"):
            yield key, pos
