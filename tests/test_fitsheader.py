"""The fast primary-header reader gives the same `Frame` (or the same error) as astropy.

Every file is real, written by astropy; the astropy path (`_read_header`) is called directly
for the comparison, and each case also states whether the fast path must be taken, so that
the comparison cannot pass by always falling back.
"""

from __future__ import annotations

import string
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from stacker.fitsheader import UnparsedError, parse_value, read_primary_header
from stacker.frames import _fast_header, _read_header, read_frame

# The odd headers here are deliberate: astropy's warnings about them are expected noise.
pytestmark = pytest.mark.filterwarnings("ignore::astropy.utils.exceptions.AstropyUserWarning")

# Keywords read_frame looks at, and one it does not (OBJECT).
NUMERIC_KEYS = ["EXPTIME", "EXPOSURE", "CCD-TEMP", "CCD_TEMP", "TEMPERAT", "GAIN", "EGAIN",
                "OFFSET", "BLKLEVEL", "XBINNING", "YBINNING", "BLANK", "BSCALE", "BZERO"]
TEXT_KEYS = ["IMAGETYP", "FRAME", "FILTER", "DATE-OBS", "BAYERPAT", "OBJECT"]
IMAGETYPS = ["Bias Frame", "Dark Frame", "Flat Field", "DARK", "Light Frame", "Focus", "",
             "  Dark  ", "Dark Flat"]


def outcome(fn, *args):
    """The frame, or the error type and message: what a caller of read_frame sees."""
    try:
        return fn(*args)
    except Exception as exc:  # both paths must fail alike, whatever the exception
        return (type(exc).__name__, str(exc))


def both(path: Path, kind: str | None = None, root: Path | None = None):
    """(read_frame's result, the astropy path's result) for one file."""
    fast = outcome(read_frame, path, kind, root)
    slow = outcome(_read_header, path, kind, root, path.stat())
    return fast, slow


text = st.text(alphabet=string.ascii_letters + string.digits + " '/:-_.", max_size=40)
raw_number = st.builds(
    lambda sign, whole, frac, exp: f"{sign}{whole}{frac}{exp}",
    st.sampled_from(["", "-", "+"]),
    st.sampled_from(["0", "5", "300", "007", "12345678901"]),
    st.sampled_from(["", ".", ".5", ".0012"]),
    st.sampled_from(["", "E3", "E-05", "D2", "d+1", "e0"]),
)
value = st.one_of(
    st.integers(-(2**40), 2**40),
    st.floats(allow_nan=False, allow_infinity=False, width=64),
    st.booleans(),
    text,
    st.sampled_from(IMAGETYPS),
    st.tuples(st.just("raw"), raw_number),  # a number as capture programs write it
    st.tuples(st.just("raw"), st.sampled_from(["1.5 E3", "(1, 2)", "", "/ no value"])),
)


def card_for(key: str, val, i: int) -> tuple[fits.Card, str | None, bool]:
    """A card, the raw image to put in its place in the file (or None), and whether the fast
    reader may read its value (else it must leave the file to astropy)."""
    if isinstance(val, tuple):
        # astropy rewrites non-standard values on writing, so the written placeholder card is
        # replaced by the raw image afterwards (as a capture program would have written it).
        raw = val[1]
        image = f"{key:<8}= {raw:>20}".ljust(80)
        clean = any(c.isdigit() for c in raw) and " " not in raw.strip() and "(" not in raw
        card = fits.Card.fromstring(image)
        placeholder = fits.Card(key, f"RAW{i}")
        value = card.value if clean else None
        if key == "BLANK":
            clean = clean and type(value) is int
        if key in ("BSCALE", "BZERO"):
            clean = clean and type(value) in (int, float)
        return placeholder, image, clean
    card = fits.Card(key, val)
    # astropy pads strings to 8 characters: "a:" is written 'a:      ' (a possible record-valued
    # keyword card for the fast reader, which leaves it to astropy).
    clean = not isinstance(val, str) or not (": " in val.ljust(8) or ("'" in val and "/" in val))
    if key == "BLANK":
        clean = clean and type(val) is int
    if key in ("BSCALE", "BZERO"):
        clean = clean and type(val) in (int, float)
    return card, None, clean


def patch_cards(path: Path, raws: dict[str, str]) -> None:
    """Replace the placeholder cards ``'RAWi'`` of a written file by raw card images."""
    blob = bytearray(path.read_bytes())
    for placeholder, image in raws.items():
        at = blob.index(f"= '{placeholder}".encode()) - 8
        assert at % 80 == 0
        blob[at : at + 80] = image.encode("ascii")
    path.write_bytes(bytes(blob))


cards = st.lists(
    st.one_of(
        st.tuples(st.sampled_from(NUMERIC_KEYS + TEXT_KEYS), value),
        st.tuples(st.sampled_from(["IMAGETYP", "FRAME"]), st.sampled_from(IMAGETYPS)),
        st.tuples(st.sampled_from(["EXPTIME", "EXPOSURE"]), st.floats(-10, 1e4)),
        st.tuples(st.sampled_from(["COMMENT", "HISTORY"]), text),
    ),
    max_size=25,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(
    dtype=st.sampled_from(["uint16", "int16", "float32", "uint8", "int32", "float64"]),
    shape=st.tuples(st.integers(1, 4), st.integers(1, 5)),
    entries=cards,
    name=st.sampled_from(["frame_001.fits", "dark_5s_001.fits", "bias.fit", "flat_2.5s.fits"]),
    folder_kind=st.sampled_from([None, None, "bias", "dark", "flat"]),
)
def test_fast_reader_equals_astropy(tmp_path, dtype, shape, entries, name, folder_kind):
    hdu = fits.PrimaryHDU(np.arange(shape[0] * shape[1]).reshape(shape).astype(dtype))
    expect_fast, raws = True, {}
    for i, (key, val) in enumerate(entries):
        if key in ("COMMENT", "HISTORY"):
            hdu.header.append((key, val))
            continue
        card, raw, clean = card_for(key, val, i)
        # Only the first card of a keyword is read (astropy's own BSCALE/BZERO come first);
        # the value of OBJECT is never read.
        if key not in hdu.header and key != "OBJECT":
            expect_fast = expect_fast and clean
        hdu.header.append(card)  # append: repeated keywords stay, the first one counts
        if raw is not None:
            raws[f"RAW{i}"] = raw
    path = tmp_path / name
    hdu.writeto(path, overwrite=True)
    patch_cards(path, raws)

    assert (_fast_header(path) is not None) == expect_fast, fits.getheader(path).tostring("\n")
    fast, slow = both(path, folder_kind, tmp_path)
    assert fast == slow
    # --hypothesis-show-statistics: how often the fast path was taken and gave a frame
    event(f"fast path: {expect_fast}, frame: {not isinstance(fast, tuple)}")


def test_common_frames_take_the_fast_path(fitsfile):
    path = fitsfile("d.fits", np.zeros((6, 8), np.uint16), IMAGETYP="Dark Frame", EXPTIME=300.0,
                    FILTER="Ha ", CCD_TEMP=-10.1, **{"DATE-OBS": "2025-07-29T22:00:00"})
    header, offset = _fast_header(path)
    assert (offset, header["FILTER"], header.get("EXPTIME")) == (2880, "Ha", 300.0)
    fast, slow = both(path)
    assert fast == slow and fast.data_offset == 2880


def test_long_header_offset(tmp_path):
    hdu = fits.PrimaryHDU(np.zeros((3, 3), np.int16))
    for i in range(100):
        hdu.header[f"KEY{i}"] = i
    hdu.header["IMAGETYP"] = "Bias Frame"
    hdu.writeto(tmp_path / "b.fits")
    _, offset = _fast_header(tmp_path / "b.fits")
    assert offset == 3 * 2880 == fits.open(tmp_path / "b.fits")[0].fileinfo()["datLoc"]
    assert both(tmp_path / "b.fits")[0] == both(tmp_path / "b.fits")[1]


def _write(path: Path, hdus) -> Path:
    fits.HDUList(hdus).writeto(path)
    return path


@pytest.mark.parametrize("make", [
    # tile-compressed: the image is in a BINTABLE extension
    lambda: [fits.PrimaryHDU(), fits.CompImageHDU(np.ones((8, 8), np.uint16),
                                                  fits.Header({"IMAGETYP": "Dark", "EXPTIME": 2}))],
    # image in an extension, empty primary
    lambda: [fits.PrimaryHDU(), fits.ImageHDU(np.ones((4, 4), np.float32),
                                              fits.Header({"IMAGETYP": "Flat", "EXPTIME": 1}))],
    # a long string written with CONTINUE cards
    lambda: [fits.PrimaryHDU(np.ones((4, 4), np.uint16),
                             fits.Header({"IMAGETYP": "Bias", "FILTER": "L" * 100}))],
    # a 3-D cube
    lambda: [fits.PrimaryHDU(np.ones((3, 4, 4), np.uint16), fits.Header({"IMAGETYP": "Bias"}))],
])
def test_files_left_to_astropy(tmp_path, make):
    path = _write(tmp_path / "x.fits", make())
    assert _fast_header(path) is None
    fast, slow = both(path)
    assert fast == slow


@pytest.mark.parametrize("card", [
    "HIERARCH EXPTIME = 5",         # astropy finds it as EXPTIME
    "EXPTIME   5",                  # no value indicator: invalid card, still named EXPTIME
    "EXP= 5",                       # astropy cuts the keyword at an early '= '
    "FILTER  = 'DP1: 5'",           # record-valued keyword card in astropy
    "EXPTIME = 'a''s/b'",           # astropy's lazy string pattern ends early
    "GAIN    = 1.5 E3",             # blanks inside a number
    "GAIN    =",                    # no value
    "ZIMAGE  =                    T",
])
def test_odd_cards_are_left_to_astropy(tmp_path, card):
    hdu = fits.PrimaryHDU(np.ones((4, 4), np.uint16), fits.Header({"IMAGETYP": "Dark Frame"}))
    hdu.header["PLACE"] = "RAW0"
    path = tmp_path / "dark_3s.fits"
    hdu.writeto(path)
    patch_cards(path, {"RAW0": card.ljust(80)})
    assert _fast_header(path) is None
    fast, slow = both(path)
    assert fast == slow


def test_irrelevant_odd_cards_do_not_prevent_the_fast_path(tmp_path):
    hdu = fits.PrimaryHDU(np.ones((4, 4), np.uint16), fits.Header({"IMAGETYP": "Dark Frame"}))
    cards = ("HIERARCH ESO DET DIT = 5", "OBJECT  = 'M: 31'", "SITELAT = (1, 2)",
             "NOTE      no value indicator", "DATE-OBS= '2025-01-01T00:00:00'")
    for i in range(len(cards)):
        hdu.header[f"PLACE{i}"] = f"RAW{i}"
    path = tmp_path / "dark_3s.fits"
    hdu.writeto(path)
    patch_cards(path, {f"RAW{i}": card.ljust(80) for i, card in enumerate(cards)})
    assert _fast_header(path) is not None
    fast, slow = both(path)
    assert fast == slow


@pytest.mark.parametrize("cut", [100, 2880, 2880 + 1000])
def test_damaged_headers_are_left_to_astropy(tmp_path, cut):
    hdu = fits.PrimaryHDU(np.ones((4, 4), np.uint16), fits.Header({"IMAGETYP": "Bias"}))
    for i in range(40):
        hdu.header[f"KEY{i}"] = i  # two header blocks
    path = tmp_path / "bias.fits"
    hdu.writeto(path)
    path.write_bytes(path.read_bytes()[:cut])
    assert read_primary_header(path, {"BITPIX"}) is None
    fast, slow = both(path)
    assert fast == slow and isinstance(fast, tuple)


@pytest.mark.parametrize(("text", "value"), [
    ("'Ha      '", "Ha      "), ("'it''s'", "it's"), ("''", ""), ("T / yes", True),
    ("F", False), ("300", 300), ("-1.5D3", -1500.0), (".5e1", 5.0), ("007", 7), ("+2.", 2.0),
])
def test_values_read_as_astropy_reads_them(text, value):
    got = parse_value(text)
    assert got == value and type(got) is type(value)
    card = fits.Card.fromstring(f"KEY     = {text}".ljust(80))
    assert card.value == (value.rstrip() if isinstance(value, str) else value)


@pytest.mark.parametrize("text", ["", "/ c", "(1, 2)", "1 .5", "'open", "'a' b", "X"])
def test_unreadable_values(text):
    with pytest.raises(UnparsedError):
        parse_value(text)
