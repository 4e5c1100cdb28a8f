"""Shared test helpers: real FITS files written with astropy."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits


def write_fits(path: Path, data: np.ndarray, compressed: bool = False, **header) -> Path:
    """Write `data` as a real FITS file with header keywords (uint16 -> BZERO=32768)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    hdr = fits.Header()
    for key, value in header.items():
        hdr[key.replace("_", "-") if key == "CCD_TEMP" else key] = value
    if compressed:
        fits.HDUList([fits.PrimaryHDU(), fits.CompImageHDU(data, header=hdr)]).writeto(path)
    else:
        fits.PrimaryHDU(data, header=hdr).writeto(path)
    return path


@pytest.fixture
def fitsfile(tmp_path):
    """Factory: fitsfile(name, data, **header) -> Path of a real FITS file in tmp_path."""

    def make(name: str, data: np.ndarray, compressed: bool = False, **header) -> Path:
        return write_fits(tmp_path / name, data, compressed=compressed, **header)

    return make
