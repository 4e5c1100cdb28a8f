"""Discovery and inventory: one `Frame` record per file, built from its header alone.

No pixel is read here. A file that cannot be used is kept as a `Skipped` record with the
reason, so that the log, the status and the report can name it.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from stacker.errors import InputError
from stacker.fitsheader import FastHeader, read_primary_header

if TYPE_CHECKING:
    from astropy.io.fits import Header

    from stacker.config import Settings

#: File endings recognised as FITS frames (matched case-insensitively).
FITS_SUFFIXES = (".fits", ".fit", ".fts", ".fits.fz", ".fit.fz", ".fts.fz")
KINDS = ("bias", "dark", "flat")

# BITPIX -> (numpy dtype of the stored big-endian values, logical dtype name)
_BITPIX = {8: ">u1", 16: ">i2", 32: ">i4", 64: ">i8", -32: ">f4", -64: ">f8"}

# "5s", "5.000s", "0.5s", "dark_5s", "300sec", "exp_2.5s": a number directly followed by s/sec.
_EXPOSURE_IN_NAME = re.compile(
    r"(?:^|[_\-\s])(\d+(?:\.\d+)?)\s*s(?:ec)?(?![a-z])", re.I
)


@dataclass(frozen=True)
class Frame:
    """What the header of one calibration frame says, plus where its pixels are.

    Attributes
    ----------
    path : Path
        The file.
    kind : str
        ``"bias"``, ``"dark"`` or ``"flat"`` (or ``"master"`` for a master read back).
    exptime : float or None
        Exposure time in seconds.
    exptime_source : str
        Where `exptime` came from: a header keyword or ``"file name"``.
    shape : tuple of int
        ``(ny, nx)``.
    bitpix, bscale, bzero, blank
        FITS scaling: physical = raw * bscale + bzero; raw == blank is missing.
    hdu_index : int
        The HDU holding the image (1 for tile-compressed files).
    data_offset : int or None
        Byte offset of the first pixel in the file; None for compressed data.
    egain : float or None
        ``EGAIN`` (electrons per ADU) when it is a positive number.
    bayerpat : str or None
        ``BAYERPAT`` (upper case) when it is an arrangement of R, G, G and B.
    """

    path: Path
    kind: str
    exptime: float | None
    exptime_source: str
    shape: tuple[int, int]
    bitpix: int
    bscale: float = 1.0
    bzero: float = 0.0
    blank: int | None = None
    hdu_index: int = 0
    data_offset: int | None = None
    ccd_temp: float | None = None
    gain: float | None = None
    offset: float | None = None
    binning: tuple[int, int] = (1, 1)
    filter: str | None = None
    date_obs: str | None = None
    size: int = 0
    mtime: float = 0.0
    egain: float | None = None
    bayerpat: str | None = None

    @property
    def compressed(self) -> bool:
        """True when the pixels are tile-compressed and must be decoded by astropy."""
        return self.data_offset is None

    @property
    def stored_dtype(self) -> str:
        """Numpy dtype string of the pixels as stored in the file (big-endian)."""
        return _BITPIX[self.bitpix]

    @property
    def dtype(self) -> str:
        """Logical dtype of the physical values, e.g. ``uint16`` for BZERO=32768 int16."""
        if self.bitpix == 16 and self.bscale == 1 and self.bzero == 32768:
            return "uint16"
        if self.bitpix == 8 and self.bscale == 1 and self.bzero == 0:
            return "uint8"
        if self.bscale == 1 and self.bzero == 0:
            return {16: "int16", 32: "int32", 64: "int64", -32: "float32", -64: "float64"}[
                self.bitpix
            ]
        return "float64" if self.bitpix in (32, 64, -64) else "float32"

    @property
    def row_nbytes(self) -> int:
        """Bytes of one row of pixel data (uncompressed)."""
        return self.shape[1] * abs(self.bitpix) // 8

    @property
    def nbytes(self) -> int:
        """Bytes of pixel data (uncompressed)."""
        return self.shape[0] * self.row_nbytes


@dataclass(frozen=True)
class Skipped:
    """A file left out of the inventory, with the reason a user can act on."""

    path: Path
    reason: str


@dataclass
class Inventory:
    """Every usable frame, and every file left out with its reason."""

    frames: list[Frame] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    searched: list[Path] = field(default_factory=list)


def is_fits_name(name: str) -> bool:
    """True when a file name ends with one of `FITS_SUFFIXES` (case-insensitive)."""
    low = name.lower()
    return any(low.endswith(s) for s in FITS_SUFFIXES)


def find_files(folder: Path) -> tuple[list[Path], list[Skipped]]:
    """All FITS-named files below `folder` (recursive, sorted); non-FITS files are reported.

    Symbolic links to folders are not followed, so a link loop cannot hang the scan.
    """
    found: list[Path] = []
    others: list[Skipped] = []
    for root, dirs, files in os.walk(folder, followlinks=False):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if name.startswith("."):
                continue
            path = Path(root) / name
            if is_fits_name(name):
                found.append(path)
            else:
                others.append(Skipped(path, f"not a FITS file name (expected {_suffix_list()})"))
    return found, others


def _suffix_list() -> str:
    return ", ".join(FITS_SUFFIXES[:4])


def kind_from_imagetyp(value: object) -> str | None:
    """Map an IMAGETYP value as written by capture programs to bias/dark/flat/light."""
    text = str(value).strip().lower()
    if not text:
        return None
    if "bias" in text or "offset" in text or text == "zero":
        return "bias"
    # "Dark Flat" / "Flat Dark" are darks taken at the flat exposure: darks for our purpose.
    if "dark" in text:
        return "dark"
    if "flat" in text:
        return "flat"
    if "light" in text or "object" in text or "science" in text:
        return "light"
    return None


def kind_from_name(path: Path) -> str | None:
    """Guess the kind from a file or folder name, for files without IMAGETYP."""
    for part in (path.name, *[p.name for p in path.parents][:3]):
        low = part.lower()
        for kind in ("bias", "dark", "flat"):
            if kind in low:
                return kind
    return None


def exposure_from_name(path: Path, root: Path | None = None) -> float | None:
    """Exposure time from a file or folder name such as ``5.000s``, ``300s`` or ``dark_5s``.

    The file name is tried first, then its folders up to (excluding) `root`.
    """
    parts = [path.name]
    for parent in path.parents:
        if root is not None and (parent == root or parent in root.parents):
            break
        parts.append(parent.name)
    for part in parts:
        stem = re.sub(r"\.(fits|fit|fts)(\.fz)?$", "", part, flags=re.I)
        match = _EXPOSURE_IN_NAME.search(stem)
        if match:
            return float(match.group(1))
    return None


def _number(header: Header, *keys: str) -> tuple[float | None, str | None]:
    """First numeric value among `keys`; raises ValueError for a present non-numeric one."""
    for key in keys:
        if key in header and header[key] is not None and str(header[key]).strip() != "":
            value = header[key]
            if isinstance(value, bool):
                raise ValueError(f"{key}={value!r} is not a number")
            try:
                return float(value), key
            except (TypeError, ValueError):
                raise ValueError(f"{key}={value!r} is not a number") from None
    return None, None


def _optional_number(header: Header, *keys: str) -> float | None:
    try:
        return _number(header, *keys)[0]
    except ValueError:
        return None


def _image_hdu(hdul) -> int:
    """Index of the first HDU holding a 2-D image (primary, or the compressed extension)."""
    for i, hdu in enumerate(hdul):
        header = hdu.header
        naxis = header.get("ZNAXIS", header.get("NAXIS", 0))
        if naxis == 2 and not (header.get("XTENSION") == "BINTABLE" and "ZIMAGE" not in header):
            return i
        if naxis > 2:
            raise ValueError(f"{naxis}-dimensional image (colour cubes are not supported)")
    raise ValueError("no 2-D image in the file")


def read_frame(path: Path, kind: str | None = None, root: Path | None = None) -> Frame:
    """Build a `Frame` from the header of `path` without reading its pixels.

    A plain primary header is read by `stacker.fitsheader` (~0.2 ms instead of ~2 ms with
    astropy); every other file goes through astropy, with the same result either way.

    Parameters
    ----------
    path : Path
        A FITS file.
    kind : str, optional
        The kind implied by the folder it was found in; when None, IMAGETYP (or the
        file name) decides.
    root : Path, optional
        The input folder the file was found in; folder names below it may give the exposure.

    Raises
    ------
    ValueError
        With the reason when the file cannot be used.
    """
    stat = path.stat()
    if stat.st_size == 0:
        raise ValueError("empty file")
    fast = _fast_header(path)
    if fast is not None:
        header, data_offset = fast
        frame_kind = _decide_kind(header, path, kind)
        return _frame_from_header(path, header, frame_kind, 0, data_offset, stat, root)
    # astropy warns about damaged files on its own; we report one reason per file instead.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _read_header(path, kind, root, stat)


# Every keyword whose value `_decide_kind`, `_frame_from_header` (with `_number`) or astropy
# (building the primary HDU: GCOUNT, PCOUNT) reads. The fast reader answers only for these,
# so a keyword added to those functions must be added here (its look-up raises otherwise).
_HEADER_KEYWORDS = frozenset({
    "SIMPLE", "BITPIX", "NAXIS", "NAXIS1", "NAXIS2", "GCOUNT", "PCOUNT",
    "IMAGETYP", "FRAME", "EXPTIME", "EXPOSURE", "BSCALE", "BZERO", "BLANK",
    "CCD-TEMP", "CCD_TEMP", "TEMPERAT", "GAIN", "EGAIN", "OFFSET", "BLKLEVEL",
    "XBINNING", "YBINNING", "FILTER", "DATE-OBS", "BAYERPAT",
})
# Keywords that make a primary header other than a plain 2-D image (extension, compressed
# image, random groups): astropy decides what such a file holds.
_NOT_PLAIN = frozenset({"XTENSION", "ZIMAGE", "ZNAXIS", "ZNAXIS1", "ZNAXIS2", "ZBITPIX", "GROUPS"})


def _fast_header(path: Path) -> tuple[FastHeader, int] | None:
    """The primary header of a plain 2-D image read without astropy, and its data offset.

    None (astropy must read the file) unless the header is the common case that astropy
    certainly reads the same way: a primary 2-D image with integer structural values (in
    their standard order, which `read_primary_header` requires) and numeric scaling
    keywords. Damaged files always go to astropy, so that their reasons stay astropy's.
    """
    read = read_primary_header(path, _HEADER_KEYWORDS, _NOT_PLAIN)
    if read is None:
        return None
    header, data_offset = read
    ints = [header.get(k) for k in ("BITPIX", "NAXIS", "NAXIS1", "NAXIS2")]
    if any(type(v) is not int for v in ints) or ints[0] not in _BITPIX or ints[1] != 2:
        return None
    if ints[2] < 1 or ints[3] < 1:
        return None
    for key in ("GCOUNT", "PCOUNT", "BLANK"):
        if key in header and type(header[key]) is not int:
            return None
    for key in ("BSCALE", "BZERO"):
        if key in header and type(header[key]) not in (int, float):
            return None
    return header, data_offset


def _read_header(path: Path, kind: str | None, root: Path | None, stat) -> Frame:
    from astropy.io import fits

    try:
        hdul = fits.open(path, memmap=False, lazy_load_hdus=True, do_not_scale_image_data=True)
    except (OSError, ValueError, TypeError, IndexError) as exc:
        raise ValueError(f"not a readable FITS file ({_short(exc)})") from None
    with hdul:
        try:
            index = _image_hdu(hdul)
            hdu = hdul[index]
            header = hdu.header
        except (OSError, ValueError, TypeError, IndexError, KeyError) as exc:
            raise ValueError(f"not a readable FITS file ({_short(exc)})") from None
        compressed = "ZIMAGE" in header or hdu.__class__.__name__ == "CompImageHDU"
        # Compressed pixels are decoded by astropy: no byte offset of their own.
        data_offset = None if compressed else int(hdu.fileinfo()["datLoc"])
        frame_kind = _decide_kind(header, path, kind)
        return _frame_from_header(path, header, frame_kind, index, data_offset, stat, root)


def _decide_kind(header: Header, path: Path, folder_kind: str | None) -> str:
    typ = header.get("IMAGETYP", header.get("FRAME"))
    header_kind = kind_from_imagetyp(typ) if typ is not None else None
    if folder_kind is not None:
        if header_kind is not None and header_kind != folder_kind:
            raise ValueError(
                f"IMAGETYP {str(typ).strip()!r} says {header_kind}, but it is in the "
                f"{folder_kind} folder; move it or fix its header"
            )
        return folder_kind
    if header_kind is None:
        header_kind = kind_from_name(path)
    if header_kind is None:
        raise ValueError("no IMAGETYP header and no bias/dark/flat in its name; "
                         "put it in bias_dir, darks_dir or flats_dir")
    if header_kind == "light":
        raise ValueError(f"IMAGETYP {str(typ).strip()!r} is a light frame, not calibration")
    return header_kind


def _frame_from_header(path, header, kind, index, data_offset, stat, root) -> Frame:
    bitpix = int(header.get("ZBITPIX", header["BITPIX"]))
    if bitpix not in _BITPIX:
        raise ValueError(f"unsupported BITPIX {bitpix}")
    ny = int(header.get("ZNAXIS2", header.get("NAXIS2", 0)))
    nx = int(header.get("ZNAXIS1", header.get("NAXIS1", 0)))
    if ny < 1 or nx < 1:
        raise ValueError("image has no pixels (NAXIS1/NAXIS2 are 0)")
    try:
        exptime, source = _number(header, "EXPTIME", "EXPOSURE")
    except ValueError as exc:
        raise ValueError(f"{exc}; fix the header or remove the keyword") from None
    if exptime is None:
        exptime, source = exposure_from_name(path, root), "file name"
    if exptime is None and kind in ("dark", "flat"):
        raise ValueError("no EXPTIME/EXPOSURE header and no exposure such as '5s' in its name")
    if exptime is not None and exptime < 0:
        raise ValueError(f"negative exposure {exptime}")
    end = None if data_offset is None else data_offset + ny * nx * abs(bitpix) // 8
    if end is not None and stat.st_size < end:
        raise ValueError(f"truncated: {stat.st_size} bytes, the header promises {end}")
    blank = header.get("BLANK") if bitpix > 0 else None
    filt = header.get("FILTER")
    return Frame(
        path=path,
        kind=kind,
        exptime=exptime,
        exptime_source=source or "file name",
        shape=(ny, nx),
        bitpix=bitpix,
        bscale=float(header.get("BSCALE", 1.0)),
        bzero=float(header.get("BZERO", 0.0)),
        blank=int(blank) if blank is not None else None,
        hdu_index=index,
        data_offset=data_offset,
        ccd_temp=_optional_number(header, "CCD-TEMP", "CCD_TEMP", "TEMPERAT"),
        gain=_optional_number(header, "GAIN", "EGAIN"),
        offset=_optional_number(header, "OFFSET", "BLKLEVEL"),
        binning=(int(header.get("XBINNING", 1) or 1), int(header.get("YBINNING", 1) or 1)),
        filter=str(filt).strip() if filt is not None and str(filt).strip() else None,
        # Stripped like every text value, so astropy's strip_header_whitespace is moot.
        date_obs=str(header["DATE-OBS"]).rstrip(" ") if "DATE-OBS" in header else None,
        size=stat.st_size,
        mtime=stat.st_mtime,
        # Read here with the rest, so that quality control opens no header again.
        egain=_positive(_optional_number(header, "EGAIN")),
        bayerpat=_bayer_pattern(header.get("BAYERPAT")),
    )


def _positive(value: float | None) -> float | None:
    return value if value is not None and value > 0 else None


def _bayer_pattern(value: object) -> str | None:
    """``RGGB``, ``BGGR``, ... from a BAYERPAT value; None for anything else."""
    text = str(value).strip().upper() if value is not None else ""
    return text if sorted(text) == sorted("RGGB") else None


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:120]


def scan(settings: Settings, kinds: Iterable[str] = KINDS) -> Inventory:
    """Inventory the configured input folders for the requested frame kinds.

    Raises
    ------
    InputError
        When no folder is configured for a requested kind, or no usable frame is found;
        the message names the folders and the extensions searched.
    """
    kinds = tuple(kinds)
    sources = _sources(settings, kinds)
    inventory = Inventory()
    for folder, folder_kind in sources:
        inventory.searched.append(folder)
        if not folder.is_dir():
            inventory.skipped.append(Skipped(folder, "folder does not exist"))
            continue
        paths, others = find_files(folder)
        inventory.skipped.extend(others)
        for path in paths:
            try:
                frame = read_frame(path, folder_kind, root=folder)
            except (ValueError, OSError) as exc:
                inventory.skipped.append(Skipped(path, _reason(exc)))
                continue
            if frame.kind in kinds:
                inventory.frames.append(frame)
    if not inventory.frames:
        raise InputError(_nothing_found(inventory, kinds))
    return inventory


def _reason(exc: BaseException) -> str:
    import errno

    if isinstance(exc, PermissionError):
        return "permission denied; make it readable"
    if isinstance(exc, OSError) and exc.errno == errno.ELOOP:
        return "symbolic link loop (the link points back to itself); remove the link"
    if isinstance(exc, FileNotFoundError):
        return "broken symbolic link or the file vanished; remove the link"
    return _short(exc)


def _sources(settings: Settings, kinds: Sequence[str]) -> list[tuple[Path, str | None]]:
    dirs = {"bias": settings.bias_dir, "dark": settings.darks_dir, "flat": settings.flats_dir}
    sources: list[tuple[Path, str | None]] = [(dirs[k], k) for k in kinds if dirs[k] is not None]
    if settings.input_dir is not None:
        sources.append((settings.input_dir, None))
    if not sources:
        wanted = ", ".join(f"{k}s_dir" if k != "bias" else "bias_dir" for k in kinds)
        raise InputError(f"no input folder configured: set master_frames.input_dir or {wanted}")
    return sources


def _nothing_found(inventory: Inventory, kinds: Sequence[str]) -> str:
    folders = ", ".join(str(p) for p in inventory.searched)
    hint = ""
    if inventory.skipped:
        first = inventory.skipped[0]
        hint = f"; first problem: {first.path}: {first.reason}"
    return (
        f"No input files found: no usable {'/'.join(kinds)} frames in {folders} "
        f"(extensions {', '.join(FITS_SUFFIXES)}){hint}"
    )
