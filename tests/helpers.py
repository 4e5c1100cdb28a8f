"""Helpers shared by the end-to-end tests: the real command, configs, masters, frame copies.

Imported as ``from helpers import ...`` (pytest puts this folder on the path).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from astropy.io import fits


def run_stacker(*args: str, cwd: Path | None = None, **kw: Any) -> subprocess.CompletedProcess:
    """Run ``python -m stacker ARGS`` as a user would: a real process, output captured."""
    return subprocess.run([sys.executable, "-m", "stacker", *args], capture_output=True,
                          text=True, cwd=cwd, timeout=300, **kw)


def section(raw: Path, out: Path | str, **keys: Any) -> dict[str, Any]:
    """A ``master_frames`` section for a simulated set (bias/, darks/, flats/ under `raw`)."""
    return {"bias_dir": str(raw / "bias"), "darks_dir": str(raw / "darks"),
            "flats_dir": str(raw / "flats"), "output_dir": str(out), **keys}


def config_file(folder: Path, raw: Path, out: Path | str, name: str | None = None,
                **keys: Any) -> Path:
    """Write `section` as a YAML config in `folder` (named after `out` unless `name`)."""
    path = folder / (name or f"config_{Path(out).name}.yaml")
    path.write_text(yaml.safe_dump({"master_frames": section(raw, out, **keys)}))
    return path


def read_masters(folder: Path) -> dict[str, tuple[Path, np.ndarray]]:
    """The masters in `folder` by their MASTERID: (file, image)."""
    found = {}
    for path in sorted(folder.glob("master_*.fits")):
        with fits.open(path) as hdul:
            found[hdul[0].header["MASTERID"]] = (path, hdul[0].data.copy())
    return found


def write_like(src: Path, dst: Path, data=None, **cards: Any) -> Path:
    """A copy of frame `src` with new pixels and/or header cards (None deletes a card)."""
    with fits.open(src) as hdul:
        header = hdul[0].header.copy()
        pixels = hdul[0].data if data is None else data
    for key, value in cards.items():
        key = key.replace("_", "-") if key == "CCD_TEMP" else key
        if value is None:
            header.remove(key, ignore_missing=True)
        else:
            header[key] = value
    hdu = fits.PrimaryHDU(pixels, header=header)
    if data is not None and np.asarray(data).dtype.kind == "f":
        for key in ("BZERO", "BSCALE"):
            hdu.header.remove(key, ignore_missing=True)
    hdu.writeto(dst)
    return dst
