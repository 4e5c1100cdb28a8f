"""Reading finished masters (or any image HDU) strip by strip, for metrics and reports.

A master is a float32 image HDU plus an int16 ``NUSED`` HDU; with
``save_individual_masters: false`` both live in one multi-extension file under the names
``<JOB_ID>`` and ``<JOB_ID>_NUSED``. `locate` finds them either way; `image_frame` turns
any image HDU into a `Frame` that `StripReader` reads with positioned reads.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from concurrent.futures import Executor
from pathlib import Path

import numpy as np

from stacker.fitsheader import FastHeader, read_hdus
from stacker.frames import Frame
from stacker.io import StripReader, pass_rows, plan_strips

#: Keywords `image_frame` and `locate` read besides the structural ones.
_KEYWORDS = ("EXTNAME", "BSCALE", "BZERO", "ZIMAGE")


def _names(hdus: list[tuple[FastHeader, int]]) -> list[str]:
    """astropy's ``hdu.name`` of each HDU: EXTNAME upper-cased, else PRIMARY or ''."""
    names = []
    for i, (header, _) in enumerate(hdus):
        ext = header.get("EXTNAME")
        names.append(ext.strip().upper() if isinstance(ext, str) else "PRIMARY" if i == 0
                     else "")
    return names


def _fast_image_frame(path: Path, hdu: int | str) -> Frame | None:
    """`image_frame` from headers read without astropy; None when astropy must decide
    (anything unusual, a compressed image, a missing HDU: its errors are astropy's)."""
    hdus = read_hdus(path, _KEYWORDS)
    if hdus is None:
        return None
    if isinstance(hdu, str):
        names = _names(hdus)
        key = hdu.strip().upper()
        index = next((i for i, n in enumerate(names) if n == key or (key == "PRIMARY" and i == 0)),
                     None)
    else:
        index = int(hdu) if 0 <= int(hdu) < len(hdus) else None
    if index is None:
        return None
    header, offset = hdus[index]
    if "ZIMAGE" in header or header.get("NAXIS") != 2 or (
            index and header.get("XTENSION") != "IMAGE"):
        return None
    scale = [header.get(k, d) for k, d in (("BSCALE", 1.0), ("BZERO", 0.0))]
    if any(isinstance(v, (bool, str)) for v in scale):
        return None
    return Frame(path=path, kind="master", exptime=None, exptime_source="",
                 shape=(header["NAXIS2"], header["NAXIS1"]), bitpix=header["BITPIX"],
                 bscale=float(scale[0]), bzero=float(scale[1]), hdu_index=index,
                 data_offset=offset)


def image_frame(path: Path, hdu: int | str = 0) -> Frame:
    """A `Frame` for image HDU `hdu` (index or EXTNAME) of `path`, read from its header.

    Headers are read without astropy where `stacker.fitsheader.read_hdus` can (a master
    stacker wrote always); astropy reads anything else.

    Raises
    ------
    ValueError
        When the HDU is missing or holds no 2-D image.
    """
    path = Path(path)
    fast = _fast_image_frame(path, hdu)
    return fast if fast is not None else _astropy_image_frame(path, hdu)


def _astropy_image_frame(path: Path, hdu: int | str) -> Frame:
    from astropy.io import fits

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with fits.open(path, memmap=False, lazy_load_hdus=True,
                       do_not_scale_image_data=True) as hdul:
            try:
                h = hdul[hdu]
            except (KeyError, IndexError):
                raise ValueError(f"{path}: no HDU {hdu!r}") from None
            header = h.header
            if not h.is_image or header.get("ZNAXIS", header.get("NAXIS")) != 2:
                raise ValueError(f"{path}[{hdu}]: not a 2-D image")
            compressed = "ZIMAGE" in header
            offset = None if compressed else int(h.fileinfo()["datLoc"])
            index = hdul.index_of(hdu) if isinstance(hdu, str) else int(hdu)
            shape = (int(header.get("ZNAXIS2", header["NAXIS2"])),
                     int(header.get("ZNAXIS1", header["NAXIS1"])))
            return Frame(path=path, kind="master", exptime=None, exptime_source="",
                         shape=shape, bitpix=int(header.get("ZBITPIX", header["BITPIX"])),
                         bscale=float(header.get("BSCALE", 1.0)),
                         bzero=float(header.get("BZERO", 0.0)), hdu_index=index,
                         data_offset=offset)


def locate(path: Path, job_id: str) -> tuple[int | str, int | str]:
    """The image and frames-used HDUs of master `job_id` in `path` (own file or combined)."""
    hdus = read_hdus(Path(path), _KEYWORDS)
    if hdus is not None:
        names = set(_names(hdus))
    else:
        from astropy.io import fits

        with fits.open(path, memmap=False, lazy_load_hdus=True) as hdul:
            names = {h.name for h in hdul}
    name = job_id.upper()
    if name in names:
        return name, f"{name}_NUSED"
    return 0, "NUSED" if "NUSED" in names else 1


def read_rows(frame: Frame, rows) -> np.ndarray:
    """Selected rows of one image as float32 ``(len(rows), nx)``."""
    return StripReader((frame,)).read_frame_rows(0, rows)


#: Bytes of a strip read for `profile_means`. Each strip costs a few Python calls (open,
#: read, convert, sum), which dominate below this; larger ones gain nothing. 4096x4096, the
#: int16 frames-used map and the float32 image, best of 30 interleaved: 256 KiB 16.5 and
#: 23.2 ms, 512 KiB 14.3 and 20.3, 1 MiB 12.6 and 19.2, 2 MiB 12.2 and 18.7.
SUMS_STRIP_BYTES = 1024 * 1024


class ProfileSums:
    """NaN-aware sums of an image given strip by strip, top to bottom, in one pass.

    Kept: the sum and count of the finite pixels of every ``factor x factor`` block, row and
    column (`stacker._fast.block_profile_sums`); the ragged last row and column of blocks
    count the pixels they have. Strips may have any height and need not start on a block
    boundary. NaN and inf are left out alike (the readers turn inf into NaN anyway).

    Parameters
    ----------
    shape : tuple of int
        ``(ny, nx)`` of the whole image.
    factor : int
        Side of a block, in pixels.
    """

    def __init__(self, shape: tuple[int, int], factor: int) -> None:
        ny, nx = shape
        if factor < 1:
            raise ValueError(f"factor must be >= 1, got {factor}")
        self.shape, self.factor, self.next_row = (ny, nx), factor, 0
        nby, nbx = -(-ny // factor), -(-nx // factor)
        self._acc, self._acc_miss = np.zeros(nx), np.zeros(nx + 1, np.int64)
        self._block_sum, self._block_n = np.zeros((nby, nbx)), np.zeros((nby, nbx), np.int64)
        self._row_sum, self._row_n = np.zeros(ny), np.zeros(ny, np.int64)
        self._col_sum, self._col_miss = np.zeros(nx), np.zeros(nx, np.int64)

    def add(self, strip: np.ndarray) -> None:
        """Add the next rows of the image (float32 ``(h, nx)``)."""
        from stacker.compiled import block_profile_sums

        ny, nx = self.shape
        h = strip.shape[0]
        if strip.ndim != 2 or strip.shape[1] != nx or self.next_row + h > ny:
            raise ValueError(f"strip of shape {strip.shape} does not continue a {ny}x{nx} "
                             f"image at row {self.next_row}")
        block_profile_sums(strip, self.next_row, ny, self.factor, self._acc, self._acc_miss,
                           self._block_sum, self._block_n, self._row_sum, self._row_n,
                           self._col_sum, self._col_miss)
        self.next_row += h

    def means(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(blocks, rows, columns)`` means in float64; NaN where no pixel is finite.

        Raises
        ------
        ValueError
            When rows are still missing (their blocks and columns would be wrong).
        """
        ny = self.shape[0]
        if self.next_row != ny:
            raise ValueError(f"only {self.next_row} of {ny} rows were added")
        with np.errstate(invalid="ignore", divide="ignore"):
            return (self._block_sum / self._block_n, self._row_sum / self._row_n,
                    self._col_sum / (ny - self._col_miss))


def profile_means(frame: Frame, factor: int, rows: int, sample: Sequence[int] = (),
                  span: tuple[int, int] | None = None
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Block, row and column means of an image (NaN ignored), and some of its rows, read once.

    Parameters
    ----------
    frame : Frame
        The image.
    factor : int
        Side of the averaged blocks (the last row and column of blocks may be partial).
    rows : int
        Most rows read at once (the memory budget); strips are kept to about
        `SUMS_STRIP_BYTES` below that.
    sample : sequence of int
        Rows to return as they are read (the ones `read_rows` would give, without reading
        them again).
    span : (int, int), optional
        Only rows ``[y0, y1)``, measured as an image of their own (its blocks start at y0).

    Returns
    -------
    blocks, row_means, col_means : numpy.ndarray
        float64 ``(ceil(ny / factor), ceil(nx / factor))``, ``(ny,)`` and ``(nx,)``, for the
        ``ny = y1 - y0`` rows measured.
    sampled : numpy.ndarray
        float32, the rows of `sample` within the span, sorted, ``(k, nx)``.
    """
    top, bottom = span or (0, frame.shape[0])
    nx = frame.shape[1]
    sums = ProfileSums((bottom - top, nx), factor)
    wanted = np.unique(np.asarray(sample, dtype=np.int64))
    wanted = wanted[(wanted >= top) & (wanted < bottom)]
    sampled = np.empty((wanted.size, nx), np.float32)
    step = pass_rows(nx, rows, SUMS_STRIP_BYTES)
    # One buffer for every strip: a fresh array per strip would be paged in again each time.
    buf = np.empty((1, min(step, bottom - top), nx), np.float32)
    reader = StripReader((frame,))
    for y0, y1 in plan_strips(bottom - top, step):
        strip = reader.read(top + y0, top + y1, out=buf[:, : y1 - y0])[0]
        sums.add(strip)
        lo, hi = np.searchsorted(wanted, [top + y0, top + y1])
        sampled[lo:hi] = strip[wanted[lo:hi] - top - y0]
    return (*sums.means(), sampled)


def block_mean(frame: Frame, factor: int, rows: int, pool: Executor | None = None
               ) -> np.ndarray:
    """The image averaged in ``factor x factor`` blocks (NaN ignored), read strip by strip.

    The last partial block row and column are averaged over the pixels they have; a block
    without a finite pixel is NaN. With `pool`, the lower half of the rows (cut between two
    rows of blocks) is read on one of its threads meanwhile: the reads and the sums release
    the GIL (4096x4096 int16 on two threads: 17 -> 9 ms).
    """
    ny = frame.shape[0]
    cut = ny // 2 // factor * factor
    if pool is None or cut == 0:
        return profile_means(frame, factor, rows)[0]
    lower = pool.submit(profile_means, frame, factor, rows, (), (cut, ny))
    upper = profile_means(frame, factor, rows, (), (0, cut))[0]
    return np.concatenate([upper, lower.result()[0]])
