"""``stacker inspect FILE...``: a frame's or a master's header summary and statistics.

Statistics come from about a million pixels of sampled rows (exact for small frames), so a
full-frame file is inspected in well under a second and little memory.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

#: Header keywords summarized for any frame, in this order (the first one present of each).
SUMMARY_KEYS = (("IMAGETYP", "FRAME"), ("EXPTIME", "EXPOSURE"), ("CCD-TEMP", "CCD_TEMP"),
                ("GAIN",), ("EGAIN",), ("OFFSET",), ("XBINNING",), ("YBINNING",), ("FILTER",),
                ("BAYERPAT",), ("DATE-OBS",), ("INSTRUME",))
#: Cards a stacker master carries about how it was made and what it measured.
MASTER_KEYS = ("NCOMBINE", "COMBMETH", "SIGLOW", "SIGHIGH", "SIGCENT", "SIGSTDEV", "SIGITER",
               "NLOW", "NHIGH", "NORMMETH", "NORMFACT", "CALSUB", "DATAMEAN", "DATAMED",
               "DATASTD", "DATAMIN", "DATAMAX", "NUSEDAVG", "NUSEDMIN", "REJFRAC", "CREATOR",
               "MASTERID", "NHOT", "NLOW")


def describe(path: Path) -> str:
    """A few lines about `path`: size, dtype, header summary, statistics.

    Raises
    ------
    ValueError
        With a one-line reason when the file is not a readable FITS image.
    """
    from astropy.io import fits

    from stacker.combine import sample_rows
    from stacker.frames import _image_hdu
    from stacker.images import image_frame, read_rows

    path = Path(path)
    if not path.is_file():
        raise ValueError("no such file" if not path.exists() else "not a file")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            with fits.open(path, memmap=False, lazy_load_hdus=True) as hdul:
                index = _image_hdu(hdul)
                header = hdul[index].header.copy()
                extensions = [h.name for h in hdul]
        except (OSError, ValueError, TypeError, IndexError, KeyError) as exc:
            raise ValueError(f"not a readable FITS image ({str(exc).splitlines()[0][:100]})"
                             ) from None
        frame = image_frame(path, index)
        ny, nx = frame.shape
        try:
            values = read_rows(frame, sample_rows(ny, nx)).astype(np.float64)
        except OSError as exc:
            raise ValueError(f"cannot read its pixels ({exc})") from None
    lines = [f"{path}", f"  size      {nx} x {ny} px, {frame.dtype}, HDU {index} "
             f"({', '.join(extensions)})"]
    for keys in SUMMARY_KEYS:
        key = next((k for k in keys if k in header), None)
        if key is not None:
            lines.append(f"  {key:<9} {header[key]}")
    finite = values[np.isfinite(values)]
    n = values.size
    if finite.size:
        lines.append(f"  stats     mean {finite.mean():.6g}  median {np.median(finite):.6g}  "
                     f"std {finite.std():.6g}  min {finite.min():.6g}  max {finite.max():.6g}")
    lines.append(f"  sampled   {n} px of {nx * ny} ({n / (nx * ny):.0%}); "
                 f"non-finite {n - finite.size}")
    cards = [f"{k}={header[k]}" for k in dict.fromkeys(MASTER_KEYS) if k in header]
    if cards:
        lines.append("  stacker   " + "  ".join(cards))
    return "\n".join(lines)
