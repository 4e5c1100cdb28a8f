"""Headers written and HDUs located without astropy give astropy's bytes and answers.

`format_card`, `HeaderCards` and `image_header_bytes` are held to astropy's own card images
byte for byte (astropy is the reference implementation here); `read_hdus` and
`images.image_frame` to what astropy finds in real files it wrote.
"""

from __future__ import annotations

import string
import warnings
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from stacker.fitsheader import HeaderCards, format_card, read_hdus
from stacker.images import _astropy_image_frame, _fast_image_frame, image_frame, locate
from stacker.io import image_header_bytes

KEYWORDS = st.text(string.ascii_uppercase + string.digits + "_-", min_size=1, max_size=8)
PRINTABLE = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=160)
COMMENTS = st.one_of(PRINTABLE, st.text(" x", max_size=90))  # blank or blank-padded too
VALUES = st.one_of(
    PRINTABLE,
    # Long ones continue on CONTINUE cards: blanks for the word breaks, quotes to escape.
    st.text("ab '/&", min_size=60, max_size=200),
    st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), min_size=60, max_size=200),
    st.booleans(),
    st.integers(-(10**18), 10**18),
    st.floats(allow_nan=False, allow_infinity=False),
    st.floats(width=32, allow_nan=False, allow_infinity=False).map(np.float32),
    st.integers(-1000, 1000).map(np.int16),
)


def astropy_image(keyword, value, comment):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "comment will be truncated"
        return fits.Card(keyword, value, comment).image


@settings(max_examples=1000, deadline=None)
@given(keyword=KEYWORDS, value=VALUES, comment=COMMENTS)
def test_cards_are_astropys(keyword, value, comment):
    if keyword in ("HISTORY", "COMMENT", "CONTINUE", "END") or keyword.startswith("HIERARCH"):
        return
    mine = format_card(keyword, value, comment)
    assert mine == astropy_image(keyword, value, comment)
    event(f"cards: {len(mine) // 80}")


@given(keyword=st.sampled_from(["HISTORY", "COMMENT"]), text=PRINTABLE)
def test_commentary_cards_are_astropys(keyword, text):
    assert format_card(keyword, text) == astropy_image(keyword, text, "")


@pytest.mark.parametrize(("keyword", "value", "why"), [
    ("lower", 1, "A-Z"), ("TOOLONGKEY", 1, "A-Z"), ("NAN", float("nan"), "finite"),
    ("INF", float("-inf"), "finite"), ("TEXT", "é", "printable ASCII"),
    ("LIST", [1], "cannot write a list"), ("NONE", None, "cannot write a NoneType"),
])
def test_unwritable_cards_raise_naming_the_card(keyword, value, why):
    with pytest.raises(ValueError, match=why):
        format_card(keyword, value, "c")


OPS = st.lists(st.one_of(
    st.tuples(st.just("set"), st.sampled_from(["A", "B", "C", "DATE", "NCOMBINE"]),
              st.one_of(st.integers(-5, 5), st.text("xy", max_size=4)),
              st.one_of(st.none(), st.text("cd ", max_size=10))),
    st.tuples(st.just("history"), st.text("ab ", max_size=100)),
), max_size=20)


@given(ops=OPS)
def test_header_cards_order_and_update_as_astropy(ops):
    mine, theirs = HeaderCards(), fits.Header()
    for op in ops:
        if op[0] == "history":
            mine.add_history(op[1])
            theirs.add_history(op[1])
        else:
            _, key, value, comment = op
            item = value if comment is None else (value, comment)
            mine[key] = item
            theirs[key] = item
    assert mine.to_string() == theirs.tostring()
    for key in theirs:
        if key != "HISTORY":
            assert mine[key] == theirs[key]
    assert ("A" in mine) == ("A" in theirs)


def astropy_image_header(header: fits.Header, shape, bitpix, primary) -> bytes:
    """The astropy implementation image_header_bytes replaced (stacker 0.x, 2026-12-02)."""
    ny, nx = shape
    out = (fits.PrimaryHDU() if primary else fits.ImageHDU()).header.copy()
    out["BITPIX"] = bitpix
    out["NAXIS"] = 2
    out.insert("NAXIS", ("NAXIS1", nx), after=True)
    out.insert("NAXIS1", ("NAXIS2", ny), after=True)
    if primary:
        out["EXTEND"] = True
    for card in header.cards:
        if card.keyword not in ("SIMPLE", "XTENSION", "BITPIX", "NAXIS", "NAXIS1", "NAXIS2",
                                "EXTEND", "PCOUNT", "GCOUNT", "BZERO", "BSCALE"):
            out.append(card, end=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return out.tostring().encode("ascii")


@settings(max_examples=200, deadline=None)
@given(cards=st.lists(st.tuples(KEYWORDS, VALUES, st.text("ab /", max_size=60)), max_size=40),
       history=st.lists(PRINTABLE, max_size=5), primary=st.booleans(),
       bitpix=st.sampled_from([-32, 16]))
def test_image_headers_are_astropys(cards, history, primary, bitpix):
    mine, theirs = HeaderCards(), fits.Header()
    for key, value, comment in cards:
        # Setting a key again is test_header_cards_order_and_update_as_astropy's (astropy
        # keeps the old value when the new one is equal, 0.0 for -0.0).
        if key in ("HISTORY", "COMMENT", "CONTINUE", "END") or key in mine:
            continue
        mine[key] = (value, comment)
        theirs[key] = (value, comment)
    for text in history:
        mine.add_history(text)
        theirs.add_history(text)
    expected = astropy_image_header(theirs, (7, 9), bitpix, primary)
    assert image_header_bytes(mine, (7, 9), bitpix=bitpix, primary=primary) == expected
    assert image_header_bytes(theirs, (7, 9), bitpix=bitpix, primary=primary) == expected


# --------------------------------------------------------------------------------------------
# Locating HDUs


def hdus_by_astropy(path: Path):
    with fits.open(path) as hdul:
        return [(hdu.header.get("EXTNAME"), hdu.fileinfo()["datLoc"]) for hdu in hdul]


def write(path: Path, *hdus) -> Path:
    fits.HDUList(list(hdus)).writeto(path)
    return path


def sample_files(tmp_path: Path) -> dict[str, Path]:
    image = np.arange(12, dtype=np.float32).reshape(3, 4)
    table = fits.BinTableHDU.from_columns([fits.Column("X", "D", array=[1.0, 2.0, 3.0])],
                                          name="INPUTS")
    return {
        "plain": write(tmp_path / "plain.fits", fits.PrimaryHDU(image)),
        "master": write(tmp_path / "master.fits", fits.PrimaryHDU(image),
                        fits.ImageHDU(image.astype(np.int16), name="NUSED"), table),
        "mef": write(tmp_path / "mef.fits", fits.PrimaryHDU(),
                     fits.ImageHDU(image, name="DARK_60S"),
                     fits.ImageHDU(image.astype(np.int16), name="dark_60s_nused"),
                     fits.ImageHDU(np.zeros((2, 3, 4), np.uint8), name="CUBE"),
                     fits.ImageHDU(np.zeros((5, 5), np.uint16), name="SCALED")),
        "compressed": write(tmp_path / "compressed.fits", fits.PrimaryHDU(),
                            fits.CompImageHDU(image, name="SQUEEZED")),
    }


def test_read_hdus_finds_what_astropy_finds(tmp_path):
    for name, path in sample_files(tmp_path).items():
        hdus = read_hdus(path, ["EXTNAME"])
        assert hdus is not None, name
        assert [(h.get("EXTNAME"), offset) for h, offset in hdus] == hdus_by_astropy(path)


def test_read_hdus_leaves_damaged_files_to_astropy(tmp_path):
    path = sample_files(tmp_path)["master"]
    blob = path.read_bytes()
    (tmp_path / "short.fits").write_bytes(blob[:-2880])
    (tmp_path / "trailing.fits").write_bytes(blob + b"\0" * 100)
    (tmp_path / "bad_naxis.fits").write_bytes(blob.replace(b"NAXIS2  =                    3",
                                                           b"NAXIS2  =                 -3"))
    (tmp_path / "text.fits").write_bytes(b"not a FITS file" * 300)
    for name in ("short", "trailing", "bad_naxis", "text"):
        assert read_hdus(tmp_path / f"{name}.fits", ["EXTNAME"]) is None, name


def test_image_frames_fast_equal_astropy(tmp_path):
    files = sample_files(tmp_path)
    cases = [("plain", 0), ("plain", "PRIMARY"), ("master", 0), ("master", "NUSED"),
             ("master", "nused"), ("master", 1), ("mef", "DARK_60S"), ("mef", "DARK_60S_NUSED"),
             ("mef", 1), ("mef", "SCALED")]
    for name, hdu in cases:
        fast = _fast_image_frame(files[name], hdu)
        assert fast is not None, (name, hdu)
        assert fast == _astropy_image_frame(files[name], hdu), (name, hdu)
    # Left to astropy, and read by it: compressed, or no such 2-D image HDU.
    assert _fast_image_frame(files["compressed"], "SQUEEZED") is None
    assert image_frame(files["compressed"], "SQUEEZED").shape == (3, 4)
    for name, hdu, error in [("master", "INPUTS", "not a 2-D image"),
                             ("master", 2, "not a 2-D image"), ("mef", "CUBE", "not a 2-D"),
                             ("mef", 0, "not a 2-D image"), ("master", "NOPE", "no HDU"),
                             ("master", 7, "no HDU")]:
        with pytest.raises(ValueError, match=error):
            image_frame(files[name], hdu)


def test_locate_finds_own_and_combined_masters(tmp_path):
    files = sample_files(tmp_path)
    assert locate(files["master"], "dark_60s") == (0, "NUSED")
    assert locate(files["mef"], "dark_60s") == ("DARK_60S", "DARK_60S_NUSED")
    assert locate(files["plain"], "x") == (0, 1)


@settings(max_examples=50, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(shapes=st.lists(st.tuples(st.integers(0, 40), st.integers(1, 50)), min_size=1,
                       max_size=4),
       names=st.lists(st.text("ABC_", min_size=1, max_size=6), min_size=3, max_size=3))
def test_read_hdus_offsets_for_any_sizes(tmp_path, shapes, names):
    hdus = [fits.PrimaryHDU(np.ones(shapes[0], np.int16))]
    hdus += [fits.ImageHDU(np.ones(s, np.float32), name=n)
             for s, n in zip(shapes[1:], names[: len(shapes) - 1], strict=True)]
    path = tmp_path / "any.fits"
    fits.HDUList(hdus).writeto(path, overwrite=True)
    got = read_hdus(path, ["EXTNAME"])
    assert [(h.get("EXTNAME"), offset) for h, offset in got] == hdus_by_astropy(path)
