"""Reading finished masters (or any image HDU) strip by strip, for metrics and reports.

A master is a float32 image HDU plus an int16 ``NUSED`` HDU; with
``save_individual_masters: false`` both live in one multi-extension file under the names
``<JOB_ID>`` and ``<JOB_ID>_NUSED``. `locate` finds them either way; `image_frame` turns
any image HDU into a `Frame` that `StripReader` reads with positioned reads.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from stacker.frames import Frame
from stacker.io import StripReader, plan_strips


def image_frame(path: Path, hdu: int | str = 0) -> Frame:
    """A `Frame` for image HDU `hdu` (index or EXTNAME) of `path`, read from its header.

    Raises
    ------
    ValueError
        When the HDU is missing or holds no 2-D image.
    """
    from astropy.io import fits

    path = Path(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with fits.open(path, memmap=False, lazy_load_hdus=True,
                       do_not_scale_image_data=True) as hdul:
            try:
                h = hdul[hdu]
            except (KeyError, IndexError):
                raise ValueError(f"{path}: no HDU {hdu!r}") from None
            header = h.header
            if header.get("NAXIS") != 2:
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
    from astropy.io import fits

    with fits.open(path, memmap=False, lazy_load_hdus=True) as hdul:
        names = {h.name for h in hdul}
    name = job_id.upper()
    if name in names:
        return name, f"{name}_NUSED"
    return 0, "NUSED" if "NUSED" in names else 1


def iter_strips(frame: Frame, rows: int, margin: int = 0
                ) -> Iterator[tuple[int, int, np.ndarray]]:
    """Yield ``(y0, y1, block)``: rows ``[y0, y1)`` plus up to `margin` rows each side.

    The block starts at row ``max(0, y0 - margin)``; a caller that needs neighbours (a 3x3
    median) takes them from the margin and keeps only its own rows.
    """
    reader = StripReader((frame,))
    ny = frame.shape[0]
    for y0, y1 in plan_strips(ny, max(1, rows)):
        a, b = max(0, y0 - margin), min(ny, y1 + margin)
        yield y0, y1, reader.read(a, b)[0]


def read_rows(frame: Frame, rows) -> np.ndarray:
    """Selected rows of one image as float32 ``(len(rows), nx)``."""
    return StripReader((frame,)).read_frame_rows(0, rows)


def block_mean(frame: Frame, factor: int, rows: int) -> np.ndarray:
    """The image averaged in ``factor x factor`` blocks (NaN ignored), read strip by strip.

    The last partial block row and column are averaged over the pixels they have.
    """
    ny, nx = frame.shape
    out = np.empty((-(-ny // factor), -(-nx // factor)), dtype=np.float64)
    step = max(factor, rows - rows % factor)
    reader = StripReader((frame,))
    for y0 in range(0, ny, step):
        y1 = min(ny, y0 + step)
        out[y0 // factor: -(-y1 // factor)] = _blocks(reader.read(y0, y1)[0], factor)
    return out


def _blocks(data: np.ndarray, f: int) -> np.ndarray:
    """Means of the ``f x f`` blocks of `data`, NaN ignored (an all-NaN block is NaN).

    Sums and counts of the non-NaN pixels over zero-padded blocks: the ragged last row and
    column of blocks divide by the pixels they have, and nothing goes through ``nanmean``'s
    copies.
    """
    h, w = data.shape
    ph, pw = -(-h // f) * f, -(-w // f) * f
    shape = (ph // f, f, pw // f, f)
    missing = np.isnan(data)
    sums = np.zeros((ph, pw), np.float64)
    sums[:h, :w] = data
    if missing.any():
        sums[:h, :w][missing] = 0.0
        counts = np.zeros((ph, pw), np.float64)
        counts[:h, :w] = ~missing
        n = counts.reshape(shape).sum(axis=(1, 3))
    else:  # the usual strip: every block has f x f pixels but the last row and column
        rows = np.full(ph // f, f, np.float64)
        rows[-1] = h - (ph // f - 1) * f
        cols = np.full(pw // f, f, np.float64)
        cols[-1] = w - (pw // f - 1) * f
        n = np.outer(rows, cols)
    with np.errstate(invalid="ignore", divide="ignore"):
        return sums.reshape(shape).sum(axis=(1, 3)) / n
