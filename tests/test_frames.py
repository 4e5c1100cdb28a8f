"""Inventory from headers alone: kinds, exposures, and every reason a file is left out."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from stacker.frames import (
    exposure_from_name,
    find_files,
    kind_from_imagetyp,
    read_frame,
)

U16 = np.zeros((6, 8), dtype=np.uint16)


@pytest.mark.parametrize(("value", "kind"), [
    ("Bias Frame", "bias"), ("BIAS", "bias"), ("Offset", "bias"), ("zero", "bias"),
    ("Dark Frame", "dark"), ("DARK", "dark"), ("Dark Flat", "dark"), ("FlatDark", "dark"),
    ("Flat Field", "flat"), ("FLAT", "flat"), ("Light Frame", "light"), ("Object", "light"),
    ("", None), ("Focus", None),
])
def test_imagetyp_values_of_capture_programs(value, kind):
    assert kind_from_imagetyp(value) == kind


@pytest.mark.parametrize(("name", "seconds"), [
    ("5.000s", 5.0), ("300s", 300.0), ("0.5s", 0.5), ("dark_5s.fits", 5.0),
    ("dark_5s_0001.fits", 5.0), ("Dark_300sec_001.fit", 300.0), ("M31_5s_bin1.fits", 5.0),
    ("2025-01-01_dark_0.5s.fits", 0.5), ("frame_001.fits", None), ("dark.fits", None),
])
def test_exposure_from_file_names(name, seconds):
    assert exposure_from_name(Path("/data") / name, Path("/data")) == seconds


def test_exposure_from_folder_name_below_the_root_only():
    root = Path("/data/darks")
    assert exposure_from_name(root / "5s" / "dark_0001.fits", root) == 5.0
    assert exposure_from_name(Path("/data/30s/darks/d.fits"), root=Path("/data/30s/darks")) is None


def test_header_fields_are_read_without_pixels(fitsfile):
    path = fitsfile("d.fits", U16, IMAGETYP="Dark Frame", EXPTIME=300.0012, CCD_TEMP=-10.1,
                    GAIN=100, OFFSET=50, XBINNING=2, YBINNING=2, FILTER="Ha ",
                    **{"DATE-OBS": "2025-07-29T22:00:00"})
    f = read_frame(path)
    assert (f.kind, f.exptime, f.exptime_source) == ("dark", 300.0012, "EXPTIME")
    assert (f.ccd_temp, f.gain, f.offset, f.binning, f.filter) == (-10.1, 100, 50, (2, 2), "Ha")
    assert (f.shape, f.dtype, f.data_offset) == ((6, 8), "uint16", 2880)
    assert f.date_obs == "2025-07-29T22:00:00"


@pytest.mark.parametrize(("egain", "expected"), [
    (1.5, 1.5), ("0.25", 0.25), (0, None), (-2.0, None), (True, None), ("high", None),
])
@pytest.mark.parametrize(("pattern", "bayer"), [
    ("RGGB", "RGGB"), ("  bggr ", "BGGR"), ("GRBG", "GRBG"), ("RGB", None), ("RRGB", None),
    (4, None), (None, None),
])
@pytest.mark.parametrize("compressed", [False, True])
def test_egain_and_bayer_pattern_for_quality_control(fitsfile, egain, expected, pattern,
                                                     bayer, compressed):
    """Read with the rest of the header (plain files without astropy, compressed with it),
    so that quality control reads no header again."""
    extra = {} if pattern is None else {"BAYERPAT": pattern}
    f = read_frame(fitsfile("f.fits", U16, compressed=compressed, IMAGETYP="Flat",
                            EXPTIME=1.0, EGAIN=egain, **extra))
    assert (f.egain, f.bayerpat) == (expected, bayer)
    assert f.compressed == compressed


def test_exposure_keyword_and_name_fallbacks(fitsfile, tmp_path):
    assert read_frame(fitsfile("a.fits", U16, IMAGETYP="Dark", EXPOSURE=2.5)).exptime == 2.5
    f = read_frame(fitsfile("dark_7s_01.fits", U16, IMAGETYP="Dark"))
    assert (f.exptime, f.exptime_source) == (7.0, "file name")


def test_kind_from_folder_wins_and_contradictions_are_named(fitsfile):
    path = fitsfile("x.fits", U16, EXPTIME=1.0)
    assert read_frame(path, kind="dark").kind == "dark"
    flat = fitsfile("y.fits", U16, IMAGETYP="Flat Field", EXPTIME=1.0)
    with pytest.raises(ValueError, match="IMAGETYP 'Flat Field' says flat, but it is in the dark"):
        read_frame(flat, kind="dark")


@pytest.mark.parametrize(("make", "reason"), [
    (lambda p: p.write_bytes(b""), "empty file"),
    (lambda p: p.write_bytes(b"JFIF" + bytes(5000)), "not a readable FITS file"),
    (lambda p: p.write_text("SIMPLE  = T\n" * 10), "not a readable FITS file"),
])
def test_unusable_files_give_a_reason(tmp_path, make, reason):
    path = tmp_path / "bad.fits"
    make(path)
    with pytest.raises(ValueError, match=reason):
        read_frame(path, kind="bias")


def test_truncated_file_is_detected_from_its_header(fitsfile):
    path = fitsfile("t.fits", np.zeros((100, 100), np.uint16), IMAGETYP="Bias Frame")
    with open(path, "r+b") as fh:
        fh.truncate(2880 + 5000)
    with pytest.raises(ValueError, match="truncated"):
        read_frame(path)


def test_missing_or_non_numeric_exposure(fitsfile):
    with pytest.raises(ValueError, match="no EXPTIME/EXPOSURE"):
        read_frame(fitsfile("dark.fits", U16, IMAGETYP="Dark Frame"))
    with pytest.raises(ValueError, match="EXPTIME='long' is not a number"):
        read_frame(fitsfile("d2.fits", U16, IMAGETYP="Dark Frame", EXPTIME="long"))
    # a bias needs no exposure
    assert read_frame(fitsfile("bias.fits", U16, IMAGETYP="Bias Frame")).exptime is None


def test_light_frames_and_untyped_frames_are_left_out(fitsfile):
    with pytest.raises(ValueError, match="light frame"):
        read_frame(fitsfile("l.fits", U16, IMAGETYP="Light Frame", EXPTIME=1.0))
    with pytest.raises(ValueError, match="no IMAGETYP"):
        read_frame(fitsfile("frame_001.fits", U16, EXPTIME=1.0))
    assert read_frame(fitsfile("bias_001.fits", U16)).kind == "bias"


def test_find_files_recurses_skips_hidden_and_names_others(tmp_path, fitsfile):
    for name in ("a.fits", "sub/b.FIT", "sub/c.fts", "d.fits.fz", ".hidden.fits"):
        fitsfile(name, U16, IMAGETYP="Bias Frame")
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "loop").symlink_to(tmp_path)  # a link loop must not hang the scan
    found, others = find_files(tmp_path)
    assert [p.relative_to(tmp_path).as_posix() for p in found] == [
        "a.fits", "d.fits.fz", "sub/b.FIT", "sub/c.fts"]
    assert [o.path.name for o in others] == ["notes.txt"]
    assert "not a FITS file name" in others[0].reason


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_unreadable_file(fitsfile):
    path = fitsfile("p.fits", U16, IMAGETYP="Bias Frame")
    path.chmod(0)
    with pytest.raises(PermissionError):
        read_frame(path)
