"""The INPUTS table of a master: serialized by stacker, read back by astropy as before.

`bintable_bytes` replaced ``fits.BinTableHDU.from_columns``, whose import of astropy.table
cost ~0.15 s of every run. The reference here is the code it replaced, run with astropy.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import textwrap
import urllib.parse
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from stacker.engine import _inputs_table, _nan
from stacker.frames import Frame
from stacker.io import BLOCK, MasterWriter, TableColumn, bintable_bytes, fits_ascii
from stacker.simulate import CameraModel, SimulationSpec, simulate

SHAPE = (6, 5)


def frame(path: str, exptime: float | None = 300.0, ccd_temp: float | None = -10.0,
          date_obs: str | None = "2024-05-01T21:00:00.123") -> Frame:
    return Frame(path=Path(path), kind="dark", exptime=exptime, exptime_source="EXPTIME",
                 shape=SHAPE, bitpix=16, ccd_temp=ccd_temp, date_obs=date_obs)


FRAMES = (
    frame("/data/darks/dark_0001.fits"),
    frame("/data/darks/dark_0002.fits", exptime=None, ccd_temp=None, date_obs=None),
    frame("/data/" + "a_long_folder_name/" * 40 + "dark_0003.fits", date_obs=""),
    frame("d4.fits", exptime=0.001, date_obs="2024-05-01T21:00:00.123456789 (longer than 32)"),
)
LEVELS = [1010.5, 998.25, 1003.0, 2.5e4]
SCALES = [1003.0 / lv for lv in LEVELS]


def astropy_table(frames, levels, scales) -> fits.BinTableHDU:
    """The INPUTS table as stacker built it before, with astropy's table machinery."""
    cols = [fits.Column("PATH", f"{max(len(str(f.path)) for f in frames)}A",
                        array=[str(f.path) for f in frames]),
            fits.Column("EXPTIME", "D", array=[_nan(f.exptime) for f in frames]),
            fits.Column("CCD_TEMP", "D", array=[_nan(f.ccd_temp) for f in frames]),
            fits.Column("DATE_OBS", "32A", array=[f.date_obs or "" for f in frames])]
    if levels is not None:
        cols += [fits.Column("LEVEL", "D", array=levels), fits.Column("SCALE", "D", array=scales)]
    return fits.BinTableHDU.from_columns(cols, name="INPUTS")


def astropy_bytes(hdu: fits.BinTableHDU) -> bytes:
    """The bytes astropy writes for `hdu` after an (one-record) empty primary HDU."""
    buf = io.BytesIO()
    fits.HDUList([fits.PrimaryHDU(), hdu]).writeto(buf)
    return buf.getvalue()[BLOCK:]


def write_master(path: Path, table: bytes) -> Path:
    """A complete master file (zero pixels) whose INPUTS table is `table`."""
    count = fits.Header()
    count["EXTNAME"] = "NUSED"
    writer = MasterWriter.create(path, SHAPE, fits.Header(), count, table)
    writer.write(0, np.zeros(SHAPE, np.float32), np.zeros(SHAPE, np.int16))
    return writer.commit()


@pytest.mark.parametrize("kind", ["dark", "flat"])
def test_inputs_table_reads_back_as_astropy_wrote_it(tmp_path, kind):
    levels, scales = (LEVELS, SCALES) if kind == "flat" else (None, None)
    ours = _inputs_table(FRAMES, levels, scales)
    reference = astropy_table(FRAMES, levels, scales)
    assert ours == astropy_bytes(reference)  # byte for byte: header, rows and padding

    path = write_master(tmp_path / "master.fits", ours)
    assert path.stat().st_size % BLOCK == 0
    with fits.open(path) as hdul:
        hdul.verify("exception")
        assert [h.name for h in hdul] == ["PRIMARY", "NUSED", "INPUTS"]
        table = hdul["INPUTS"]
        assert table.columns.names == reference.columns.names
        assert table.columns.formats == reference.columns.formats
        expected = ["PATH", "EXPTIME", "CCD_TEMP", "DATE_OBS"]
        assert table.columns.names == expected + (["LEVEL", "SCALE"] if levels else [])
        for name in table.columns.names:
            np.testing.assert_array_equal(table.data[name], reference.data[name])
        data = table.data
        assert list(data["PATH"]) == [str(f.path) for f in FRAMES]  # the long one whole
        assert np.isnan(data["EXPTIME"][1]) and np.isnan(data["CCD_TEMP"][1])
        assert list(data["DATE_OBS"]) == ["2024-05-01T21:00:00.123", "", "",
                                          FRAMES[3].date_obs[:32]]
        if levels:
            np.testing.assert_array_equal(data["LEVEL"], LEVELS)
            np.testing.assert_array_equal(data["SCALE"], SCALES)


def test_paths_astropy_cannot_write_are_stored_as_ascii_that_decodes_back(tmp_path):
    paths = ["/data/plain/dark.fits", "/data/données/dark.fits",
             os.fsdecode(b"/data/\xe9t\xe9/dark.fits"),  # not UTF-8: a surrogate escape
             "/data/100%/dark.fits", "/data/dark.fits  ", "/data/new\nline.fits"]
    frames = tuple(frame(p) for p in paths)
    path = write_master(tmp_path / "master.fits", _inputs_table(frames, None, None))
    with fits.open(path) as hdul:
        hdul.verify("exception")
        stored = list(hdul["INPUTS"].data["PATH"])
    assert stored[0] == paths[0]  # ordinary paths are stored as they are
    assert stored[1] == "/data/donn%C3%A9es/dark.fits"
    for value, original in zip(stored, paths, strict=True):
        assert value.isascii() and value.isprintable()
        assert os.fsdecode(urllib.parse.unquote_to_bytes(value)) == original


def test_fits_ascii_leaves_printable_ascii_alone():
    assert fits_ascii("/data/darks/dark 300s (1).fits") == "/data/darks/dark 300s (1).fits"
    assert fits_ascii("") == ""
    assert fits_ascii("/x/50%") == "/x/50%25"
    assert fits_ascii("/x/a b  ") == "/x/a b%20%20"


def test_bintable_bytes_refuses_what_it_cannot_write(tmp_path):
    with pytest.raises(ValueError, match=r"column PATH, row 1: 'é.fits' is not printable ASCII"):
        bintable_bytes([TableColumn("PATH", "8A", ["a.fits", "é.fits"])], "INPUTS")
    with pytest.raises(ValueError, match="column X: unsupported format '2D'"):
        bintable_bytes([TableColumn("X", "2D", [1.0])], "INPUTS")
    with pytest.raises(ValueError, match="column X: unsupported format '0A'"):
        bintable_bytes([TableColumn("X", "0A", [""])], "INPUTS")
    with pytest.raises(ValueError, match="different lengths"):
        bintable_bytes([TableColumn("X", "D", [1.0]), TableColumn("Y", "D", [])], "INPUTS")
    with pytest.raises(ValueError, match="whole 2880-byte records"):
        MasterWriter.create(tmp_path / "m.fits", SHAPE, fits.Header(), fits.Header(), b"x")
    assert list(tmp_path.iterdir()) == []


def test_an_empty_table_is_valid_fits(tmp_path):
    table = bintable_bytes([TableColumn("PATH", "4A", []), TableColumn("X", "D", [])], "INPUTS")
    with fits.open(write_master(tmp_path / "master.fits", table)) as hdul:
        hdul.verify("exception")
        assert len(hdul["INPUTS"].data) == 0
        assert hdul["INPUTS"].columns.names == ["PATH", "X"]


BUILD = textwrap.dedent("""
    import sys
    from stacker import MasterFrameCreator

    raw, out = sys.argv[1], sys.argv[2]
    status = MasterFrameCreator({"master_frames": {
        "bias_dir": raw + "/bias", "darks_dir": raw + "/darks", "flats_dir": raw + "/flats",
        "output_dir": out}}).create_all_master_frames()
    assert status.success, status.message
    print(sorted(m for m in sys.modules
                 if m.startswith(("astropy.table", "astropy.io.ascii"))))
""")


def test_a_master_build_never_imports_astropy_table(tmp_path):
    """A whole run in a fresh process, on inputs in a folder whose name is not ASCII."""
    raw = tmp_path / "données"
    simulate(raw, SimulationSpec(camera=CameraModel(shape=(12, 16)), n_bias=3,
                                 dark_exposures=(1.0,), n_darks=3, n_flats=3, seed=5))
    out = tmp_path / "out"
    run = subprocess.run([sys.executable, "-c", BUILD, str(raw), str(out)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip().splitlines()[-1] == "[]", "astropy.table was imported"

    masters = sorted(out.glob("master_*.fits"))
    assert len(masters) == 3  # bias, one dark, one flat
    for master in masters:
        with fits.open(master) as hdul:
            hdul.verify("exception")
            stored = list(hdul["INPUTS"].data["PATH"])
            history = "".join(hdul[0].header["HISTORY"])  # long cards wrap at 72 characters
        assert len(stored) == 3
        for value in stored:
            assert "donn%C3%A9es" in value
            assert Path(os.fsdecode(urllib.parse.unquote_to_bytes(value))).is_file()
            assert f"input: {value}" in history
