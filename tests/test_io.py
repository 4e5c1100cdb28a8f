"""StripReader against astropy's own decoding, the memory formula, and the atomic writer."""

from __future__ import annotations

import os
import threading
import time

import numpy as np
import pytest
from astropy.io import fits
from hypothesis import given, settings
from hypothesis import strategies as st

from stacker import io
from stacker.errors import FrameReadError, MemoryBudgetError
from stacker.frames import read_frame
from stacker.io import (
    STRIP_CAP,
    MasterWriter,
    StripReader,
    TableColumn,
    bintable_bytes,
    plan_strips,
    rows_per_chunk,
)

RNG = np.random.default_rng(1)


@pytest.mark.parametrize("dtype", ["uint16", "int16", "uint8", "int32", "float32", "float64"])
def test_reader_matches_astropy_for_every_bitpix(fitsfile, dtype):
    info = np.iinfo(dtype) if dtype[0] in "ui" else None
    if info is not None:
        data = RNG.integers(info.min, info.max, size=(23, 17), endpoint=True).astype(dtype)
    else:
        data = RNG.normal(1000, 50, size=(23, 17)).astype(dtype)
    path = fitsfile(f"{dtype}.fits", data, IMAGETYP="Bias Frame")
    frame = read_frame(path)
    block = StripReader((frame,)).read(0, 23)
    np.testing.assert_array_equal(block[0], data.astype(np.float32))


@pytest.mark.parametrize("dtype", ["uint16", "float32"])
def test_strips_read_in_several_pieces_are_the_frame(fitsfile, monkeypatch, dtype):
    """A strip taller than the staging buffer is read piece by piece, ragged last piece too."""
    data = RNG.integers(0, 65535, size=(23, 17)).astype(dtype)
    frame = read_frame(fitsfile(f"{dtype}.fits", data, IMAGETYP="Bias Frame"))
    monkeypatch.setattr(io, "STAGING_BYTES", 3 * 17 * abs(frame.bitpix) // 8)  # 3 rows
    reader = StripReader((frame,))
    for y0, y1 in [(0, 23), (2, 13), (22, 23)]:
        np.testing.assert_array_equal(reader.read(y0, y1)[0], data[y0:y1].astype(np.float32))


def test_camera_frames_are_read_as_uint16_and_others_as_float32(fitsfile):
    data = RNG.integers(0, 65535, size=(9, 13)).astype(np.uint16)
    camera = read_frame(fitsfile("cam.fits", data, IMAGETYP="Dark Frame", EXPTIME=1.0))
    other = read_frame(fitsfile("f.fits", data.astype(np.float32), IMAGETYP="Dark Frame",
                                EXPTIME=1.0))
    reader = StripReader((camera, camera))
    assert reader.dtype == np.uint16
    out = np.empty((2, 5, 13), np.uint16)
    np.testing.assert_array_equal(reader.read(2, 7, out=out)[1], data[2:7])
    assert StripReader((camera, other)).dtype == np.float32
    with pytest.raises(ValueError, match="uint16"):
        StripReader((camera, other)).read(0, 1, out=np.empty((2, 1, 13), np.uint16))


def test_uint16_is_stored_with_bzero_and_decoded_exactly(fitsfile):
    data = np.array([[0, 1, 32767, 32768, 65535]], dtype=np.uint16)
    frame = read_frame(fitsfile("u.fits", data, IMAGETYP="Dark Frame", EXPTIME=1.0))
    assert (frame.bitpix, frame.bzero, frame.dtype) == (16, 32768.0, "uint16")
    np.testing.assert_array_equal(StripReader((frame,)).read(0, 1)[0], data)


def test_bscale_bzero_and_blank_become_physical_and_nan(tmp_path):
    raw = np.array([[10, 20], [-5, 99]], dtype=np.int16)
    hdu = fits.PrimaryHDU(raw)
    hdu.header["BSCALE"], hdu.header["BZERO"], hdu.header["BLANK"] = 0.5, 100.0, 99
    hdu.header["IMAGETYP"] = "Bias Frame"
    path = tmp_path / "scaled.fits"
    hdu.writeto(path)
    out = StripReader((read_frame(path),)).read(0, 2)[0]
    np.testing.assert_array_equal(out[0], [105.0, 110.0])
    assert out[1, 0] == 97.5 and np.isnan(out[1, 1])


def test_inf_in_float_frames_is_missing(fitsfile):
    data = np.array([[1.0, np.inf, -np.inf, np.nan]], dtype=np.float32)
    frame = read_frame(fitsfile("f.fits", data, IMAGETYP="Bias Frame"))
    out = StripReader((frame,)).read(0, 1)[0]
    assert out[0, 0] == 1.0 and np.isnan(out[0, 1:]).all()


def test_compressed_frames_read_by_strip(fitsfile):
    data = RNG.integers(0, 65535, size=(40, 31)).astype(np.uint16)
    frame = read_frame(fitsfile("c.fits.fz", data, compressed=True, IMAGETYP="Flat Field",
                                EXPTIME=2.0))
    assert frame.compressed and frame.hdu_index == 1 and frame.shape == (40, 31)
    np.testing.assert_array_equal(StripReader((frame,)).read(7, 19)[0], data[7:19])


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 30), st.integers(1, 30), st.integers(1, 4))
def test_strips_of_any_height_reassemble_the_frames(tmp_path_factory, ny, rows, n):
    folder = tmp_path_factory.mktemp("strips")
    frames, truth = [], []
    for i in range(n):
        data = RNG.integers(0, 65535, size=(ny, 9)).astype(np.uint16)
        truth.append(data)
        path = folder / f"f{i}.fits"
        fits.PrimaryHDU(data).writeto(path)
        frames.append(read_frame(path, kind="bias"))
    reader = StripReader(tuple(frames))
    parts = [reader.read(y0, y1) for y0, y1 in plan_strips(ny, rows)]
    np.testing.assert_array_equal(np.concatenate(parts, axis=1), np.stack(truth))


@pytest.mark.parametrize("width", [4, 40000])  # rows side by side in one buffer, or not
def test_read_frame_rows_picks_the_rows(fitsfile, width):
    data = RNG.integers(0, 65535, size=(200, width)).astype(np.uint16)
    frame = read_frame(fitsfile("r.fits", data, IMAGETYP="Bias Frame"))
    rows = [0, 1, 2, 5, 9, 100, 101, 199]
    np.testing.assert_array_equal(StripReader((frame,)).read_frame_rows(0, rows), data[rows])
    with open(frame.path, "r+b") as fh:
        fh.truncate(frame.data_offset + 150 * frame.row_nbytes)
    np.testing.assert_array_equal(StripReader((frame,)).read_frame_rows(0, rows[:-1]),
                                  data[rows[:-1]])
    with pytest.raises(FrameReadError, match=r"r\.fits.*shorter than its header says"):
        StripReader((frame,)).read_frame_rows(0, rows)


def test_reader_keeps_no_file_open(fitsfile):
    frames = tuple(read_frame(fitsfile(f"o{i}.fits", np.zeros((8, 8), np.uint16),
                                       IMAGETYP="Bias Frame")) for i in range(20))
    before = len(os.listdir("/proc/self/fd"))
    reader = StripReader(frames)
    reader.read(0, 4)
    assert len(os.listdir("/proc/self/fd")) == before


def test_a_reader_kept_open_reads_the_same_and_closes_its_files(fitsfile):
    import pickle

    data = [RNG.integers(0, 65535, size=(30, 7)).astype(np.uint16) for _ in range(5)]
    frames = tuple(read_frame(fitsfile(f"k{i}.fits", d, IMAGETYP="Bias Frame"))
                   for i, d in enumerate(data))
    reader = StripReader(frames)
    before = len(os.listdir("/proc/self/fd"))
    with reader.kept_open() as kept:
        assert len(os.listdir("/proc/self/fd")) == before + len(frames)
        np.testing.assert_array_equal(kept.read(3, 17), reader.read(3, 17))
        np.testing.assert_array_equal(kept.read(3, 17, out=np.empty((5, 14, 7), np.uint16)),
                                      np.stack(data)[:, 3:17])
        rows = [r.copy() for r in kept.frame_rows(0, 30)]
        np.testing.assert_array_equal(np.stack(rows), np.stack(data))
        assert pickle.loads(pickle.dumps(kept)).fds is None  # no descriptor leaves
    assert len(os.listdir("/proc/self/fd")) == before
    with pytest.MonkeyPatch.context() as mp:  # more frames than may be kept open
        mp.setattr(io, "_fd_state", {"budget": len(frames) - 1, "held": 0})
        with reader.kept_open() as kept:
            assert kept.fds is None and len(os.listdir("/proc/self/fd")) == before
            np.testing.assert_array_equal(kept.read(3, 17), reader.read(3, 17))


def test_readers_kept_open_share_the_process_budget_of_open_files(fitsfile, monkeypatch):
    """Two masters built at once hold their files against one budget: the second reader
    reads file by file while the first holds its files, and keeps its own open once they
    are closed."""
    data = RNG.integers(0, 65535, size=(12, 5)).astype(np.uint16)
    frames = tuple(read_frame(fitsfile(f"b{i}.fits", data, IMAGETYP="Bias Frame"))
                   for i in range(5))
    monkeypatch.setattr(io, "_fd_state", {"budget": 8, "held": 0})
    reader = StripReader(frames)
    with reader.kept_open() as first:
        assert first.table is not None and io._fd_state["held"] == 5
        with reader.kept_open() as second:
            assert second.fds is None and io._fd_state["held"] == 5
            np.testing.assert_array_equal(second.read(0, 12), first.read(0, 12))
    assert io._fd_state["held"] == 0
    with reader.kept_open() as again:
        assert again.table is not None
    with pytest.raises(RuntimeError), reader.kept_open():  # released on an error too
        raise RuntimeError
    assert io._fd_state["held"] == 0


def test_a_set_beyond_the_soft_limit_on_open_files_is_kept_open(tmp_path):
    """The soft limit on open files (1024 on most Linux desktops, 256 on macOS) is raised
    towards the hard one, so that 300 frames are read in one compiled loop per strip; run
    in a child process started at a soft limit of 200."""
    import resource
    import subprocess
    import sys

    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 600:
        pytest.skip(f"the hard limit on open files is {hard}")
    script = f"""
import resource
import numpy as np
from tests.conftest import write_fits
from pathlib import Path
from stacker import io
from stacker.frames import read_frame
data = np.arange(24, dtype=np.uint16).reshape(4, 6)
frames = tuple(read_frame(write_fits(Path({str(tmp_path)!r}) / f"f{{i}}.fits", data + i,
                                     IMAGETYP="Bias Frame")) for i in range(300))
with io.StripReader(frames).kept_open() as kept:
    assert kept.table is not None, "not kept open"
    got = kept.read(1, 3, out=np.empty((300, 2, 6), np.uint16))
    assert (got == np.stack([data[1:3] + i for i in range(300)])).all()
print(resource.getrlimit(resource.RLIMIT_NOFILE)[0], io._fd_budget())
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
        cwd=os.path.dirname(os.path.dirname(__file__)),
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (200, hard)))
    assert done.returncode == 0, done.stderr
    raised, budget = map(int, done.stdout.split())
    want = io.FD_WANTED if hard == resource.RLIM_INFINITY else min(hard, io.FD_WANTED)
    assert raised == want and budget == want - io.FD_RESERVE


def test_camera_data_kept_open_are_read_in_one_compiled_loop(fitsfile, monkeypatch):
    """Every frame's rows in one compiled loop (pread straight into place, then converted,
    in pieces): the values of the per-frame reads, with and without a master subtracted
    and per-frame scales. The per-frame reads are made to fail while it reads, so a
    fall-back to them would show."""
    data = [RNG.integers(0, 65535, size=(23, 9)).astype(np.uint16) for _ in range(4)]
    # frame 2's header is a block longer: its data start elsewhere
    frames = tuple(read_frame(fitsfile(f"c{i}.fits", d, IMAGETYP="Bias Frame",
                                       **({f"K{j:02d}": j for j in range(40)} if i == 2
                                          else {})))
                   for i, d in enumerate(data))
    assert frames[2].data_offset > frames[1].data_offset
    reader = StripReader(frames)
    master = RNG.normal(30000, 500, size=(23, 9)).astype(np.float32)
    scales = RNG.uniform(0.8, 1.2, size=4).astype(np.float32)
    want = {}
    for y0, y1 in [(0, 23), (5, 12), (22, 23)]:
        want[y0, y1] = [
            reader.read(y0, y1),
            reader.read(y0, y1, subtract=master[y0:y1].copy(), scales=scales),
            reader.read(y0, y1, scales=scales),
            reader.read(y0, y1, subtract=master[y0:y1].copy())]
    # pieces of 2 rows, so that a strip is several reads per frame
    monkeypatch.setattr(io, "STAGING_BYTES", 2 * frames[0].row_nbytes)

    def no_per_frame_reads(*args, **kwargs):
        raise AssertionError("read frame by frame")

    with reader.kept_open() as kept:
        assert kept.table is not None
        monkeypatch.setattr(io, "read_rows_into", no_per_frame_reads)
        for (y0, y1), (plain, both, scaled, subtracted) in want.items():
            out = np.empty((4, y1 - y0, 9), np.uint16)
            np.testing.assert_array_equal(kept.read(y0, y1, out=out),
                                          np.stack(data)[:, y0:y1])
            np.testing.assert_array_equal(kept.read(y0, y1), plain)
            sub = master[y0:y1].copy()
            np.testing.assert_array_equal(kept.read(y0, y1, subtract=sub, scales=scales), both)
            np.testing.assert_array_equal(kept.read(y0, y1, scales=scales), scaled)
            np.testing.assert_array_equal(kept.read(y0, y1, subtract=sub), subtracted)


def test_a_compiled_read_that_fails_names_the_file(fitsfile):
    """A frame cut short after its reader opened it: the compiled loop stops and the
    per-frame reads name the file."""
    frames = tuple(read_frame(fitsfile(f"t{i}.fits", np.ones((40, 30), np.uint16),
                                       IMAGETYP="Bias Frame")) for i in range(3))
    with StripReader(frames).kept_open() as kept:
        assert kept.table is not None
        os.truncate(frames[2].path, frames[2].data_offset + 10 * frames[2].row_nbytes)
        np.testing.assert_array_equal(kept.read(0, 10), np.ones((3, 10, 30)))
        with pytest.raises(FrameReadError, match=r"t2\.fits"):
            kept.read(5, 20)
        with pytest.raises(FrameReadError, match=r"t2\.fits"):
            kept.read(5, 20, out=np.empty((3, 15, 30), np.uint16))


@pytest.mark.parametrize("nlow, nhigh", [(0, 0), (1, 1)])
def test_running_sums_of_camera_data_kept_open_are_added_in_one_compiled_loop(
        fitsfile, monkeypatch, nlow, nhigh):
    """`add_frames` (read, convert and add every frame in a compiled loop, in pieces) gives
    the running sums of adding each of `frame_rows`; a frame cut short makes it return
    False, and `frame_rows` then names the file."""
    from stacker.kernels import RunningSums

    data = [RNG.integers(0, 65535, size=(23, 9)).astype(np.uint16) for _ in range(5)]
    frames = tuple(read_frame(fitsfile(f"s{i}.fits", d, IMAGETYP="Bias Frame",
                                       **({f"K{j:02d}": j for j in range(40)} if i == 1
                                          else {})))
                   for i, d in enumerate(data))  # (frame 1's data start a block later)
    monkeypatch.setattr(io, "STAGING_BYTES", 2 * frames[0].row_nbytes)  # pieces of 2 rows
    with StripReader(frames).kept_open() as kept:
        for y0, y1 in [(0, 23), (4, 13), (22, 23)]:
            want = RunningSums((y1 - y0, 9), nlow, nhigh)
            for rows in StripReader(frames).frame_rows(y0, y1):
                want.add(rows)
            got = RunningSums((y1 - y0, 9), nlow, nhigh)
            assert kept.add_frames(y0, y1, got.total, got.vmin, got.vmax, got.extremes)
            got.added(len(frames))
            np.testing.assert_array_equal(got.total, want.total)
            if nlow + nhigh:
                np.testing.assert_array_equal(got.vmin, want.vmin)
                np.testing.assert_array_equal(got.vmax, want.vmax)
            for a, b in zip(got.result(), want.result(), strict=True):
                np.testing.assert_array_equal(a, b)
        os.truncate(frames[3].path, frames[3].data_offset + 10 * frames[3].row_nbytes)
        sums = RunningSums((15, 9), nlow, nhigh)
        assert not kept.add_frames(5, 20, sums.total, sums.vmin, sums.vmax, sums.extremes)
        with pytest.raises(FrameReadError, match=r"s3\.fits"):
            list(kept.frame_rows(5, 20))


def test_only_camera_data_kept_open_are_read_compiled(fitsfile):
    floats = tuple(read_frame(fitsfile(f"f{i}.fits", np.ones((4, 4), np.float32),
                                       IMAGETYP="Bias Frame")) for i in range(2))
    with StripReader(floats).kept_open() as kept:
        assert kept.fds is not None and kept.table is None
        np.testing.assert_array_equal(kept.read(0, 4), np.ones((2, 4, 4)))


def test_a_file_gone_before_a_kept_open_reader_opens_it_is_named(fitsfile):
    frames = tuple(read_frame(fitsfile(f"g{i}.fits", np.zeros((8, 8), np.uint16),
                                       IMAGETYP="Bias Frame")) for i in range(3))
    frames[1].path.unlink()
    with StripReader(frames).kept_open() as kept, \
            pytest.raises(FrameReadError, match=r"g1\.fits"):
        kept.read(0, 4)


def test_frames_of_different_shapes_are_refused(fitsfile):
    a = read_frame(fitsfile("a.fits", np.zeros((4, 4), np.uint16), IMAGETYP="Bias Frame"))
    b = read_frame(fitsfile("b.fits", np.zeros((4, 5), np.uint16), IMAGETYP="Bias Frame"))
    with pytest.raises(ValueError, match="different shapes"):
        StripReader((a, b))


# --- strips and the memory budget ---------------------------------------------------------


def test_plan_strips_covers_every_row_once_with_a_short_last_strip():
    assert plan_strips(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert plan_strips(3, 10) == [(0, 3)]
    assert plan_strips(1, 1) == [(0, 1)]
    with pytest.raises(ValueError):
        plan_strips(10, 0)


def test_rows_per_chunk_is_the_documented_formula():
    # floor(limit / (workers * width * (n * bytes_per_value + 16)))
    assert rows_per_chunk(2_000_000_000, 200, 9576, 2, 30, strip_cap=None) == 17
    assert rows_per_chunk(10**9, 1, 100, 1, 10, strip_cap=None) == 10**9 // (100 * 26)
    # a strip never holds more than the cap, whatever the budget
    assert rows_per_chunk(10**12, 50, 4096, 2, 4) == STRIP_CAP // (50 * 4096 * 4)
    # with a height, every worker gets at least four strips when the budget allows
    assert rows_per_chunk(10**9, 1, 100, 2, 10, height=800) == 100  # 4 strips per worker


def test_rows_per_chunk_does_not_depend_on_frame_height_for_peak_memory():
    small = rows_per_chunk(512 * 2**20, 50, 4096, 2, 30, strip_cap=None)
    large = rows_per_chunk(512 * 2**20, 200, 4096, 2, 30, strip_cap=None)
    # 4x the frames -> 4x fewer rows: the bytes held per strip stay the same
    assert abs(small * 50 - large * 200) <= 200


def test_budget_that_cannot_hold_one_row_fails_with_the_numbers():
    with pytest.raises(MemoryBudgetError) as err:
        rows_per_chunk(1_000_000, 200, 9576, 2, 30, what="dark_300.000s")
    msg = str(err.value)
    assert "1.00 MB" in msg and "200 frames" in msg and "dark_300.000s" in msg
    assert "2 workers x 9576 px x (200 frames x 30 B + 16 B) = 115.22 MB" in msg


# --- the writer ---------------------------------------------------------------------------


def _writer(tmp_path, shape=(6, 5)):
    header = fits.Header()
    header["IMAGETYP"] = "MASTER DARK"
    header["DATAMEAN"] = (0.0, "mean")
    count = fits.Header()
    count["EXTNAME"] = "NUSED"
    table = bintable_bytes([TableColumn("PATH", "10A", ["a.fits", "b.fits"])], "INPUTS")
    return MasterWriter.create(tmp_path / "master.fits", shape, header, count, table)


def test_writer_is_atomic_and_round_trips(tmp_path):
    w = _writer(tmp_path)
    assert not w.final_path.exists() and w.temp_path.exists()
    image = RNG.normal(size=(6, 5)).astype(np.float32)
    count = RNG.integers(0, 50, size=(6, 5))
    w.write(0, image[:4], count[:4])
    w[0:2, 4:6, 0:5] = np.stack([image[4:], count[4:]])
    w.set_cards({"DATAMEAN": 12.5})
    assert not w.final_path.exists()
    w.commit()
    assert not w.temp_path.exists()
    with fits.open(w.final_path) as hdul:
        hdul.verify("exception")
        np.testing.assert_array_equal(hdul[0].data, image)
        np.testing.assert_array_equal(hdul["NUSED"].data, count)
        assert hdul[0].header["DATAMEAN"] == 12.5
        assert hdul[0].header["IMAGETYP"] == "MASTER DARK"
        assert list(hdul["INPUTS"].data["PATH"]) == ["a.fits", "b.fits"]


def test_writer_abort_leaves_nothing(tmp_path):
    w = _writer(tmp_path)
    w.write(0, np.zeros((6, 5)), np.zeros((6, 5)))
    w.abort()
    assert list(tmp_path.iterdir()) == []


def test_writer_refuses_cards_it_did_not_reserve(tmp_path):
    w = _writer(tmp_path)
    with pytest.raises(KeyError, match="NOTHERE"):
        w.set_cards({"NOTHERE": 1})
    w.abort()


@settings(max_examples=300, deadline=None)
@given(st.integers(10**3, 10**10), st.integers(1, 500), st.integers(1, 10000),
       st.integers(1, 4), st.integers(1, 16))
def test_rows_per_chunk_is_the_largest_strip_within_budget(limit, n, width, workers, bpv):
    def cost(r):
        return workers * r * width * (n * bpv + 16)

    try:
        rows = rows_per_chunk(limit, n, width, workers, bpv, strip_cap=None)
    except MemoryBudgetError:
        assert cost(1) > limit
        return
    assert cost(rows) <= limit < cost(rows + 1)


def _direct_or_skip(path) -> None:
    fd = io._open_direct(path)
    if fd is None:
        pytest.skip("no O_DIRECT on this file system: the read would go through the cache")
    os.close(fd)


@settings(max_examples=60, deadline=None)
@given(dtype=st.sampled_from(["uint16", "int16", "float32", "float64"]),
       nx=st.integers(1, 700), y0=st.integers(0, 29), height=st.integers(1, 30),
       chunk_rows=st.integers(1, 9), piece_rows=st.integers(1, 4))
def test_reads_around_the_page_cache_are_the_reads_through_it(tmp_path_factory, dtype, nx, y0,
                                                              height, chunk_rows, piece_rows):
    """O_DIRECT reads whole 4096-byte blocks around rows that start anywhere in them (headers
    are 2880-byte blocks, rows any width), in chunks converted piece by piece."""
    data = (RNG.integers(0, 65535, size=(30, nx)) - (32768 if dtype == "int16" else 0)
            ).astype(dtype)
    path = tmp_path_factory.mktemp("direct") / "f.fits"
    fits.PrimaryHDU(data, header=fits.Header([("IMAGETYP", "Bias Frame")])).writeto(path)
    _direct_or_skip(path)
    frame = read_frame(path)
    y1 = min(30, y0 + height)
    row = nx * data.itemsize
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(io, "DIRECT_BYTES", chunk_rows * row)
        mp.setattr(io, "STAGING_BYTES", piece_rows * row)
        out = np.empty((y1 - y0, nx), np.float32)
        io.read_rows_into(frame, y0, y1, out, direct=True)
    np.testing.assert_array_equal(out, data[y0:y1].astype(np.float32))


@settings(max_examples=60, deadline=None)
@given(nx=st.integers(1, 3000), y0=st.integers(0, 19), height=st.integers(1, 20),
       cards=st.integers(0, 80), direct=st.booleans())
def test_camera_rows_read_in_place_are_the_frames_values(tmp_path_factory, nx, y0, height,
                                                           cards, direct):
    """Rows read straight into an aligned buffer and converted where they lie, whatever the
    header's length and the rows' place in the 4096-byte blocks (or through the cache)."""
    data = RNG.integers(0, 65536, size=(20, nx)).astype(np.uint16)
    header = fits.Header([("IMAGETYP", "Bias Frame")] +
                         [(f"KEY{i}", i, "padding the header") for i in range(cards)])
    path = tmp_path_factory.mktemp("inplace") / "f.fits"
    fits.PrimaryHDU(data, header=header).writeto(path)
    frame = read_frame(path)
    y1 = min(20, y0 + height)
    buffer = io._aligned((y1 - y0) * frame.row_nbytes + 2 * io.DIRECT_ALIGN)
    with pytest.MonkeyPatch.context() as mp:
        if not direct:
            mp.setattr(io, "_open_direct", lambda path: None)
        rows = io.read_rows_direct(frame, y0, y1, buffer)
    assert rows.dtype == np.uint16 and np.shares_memory(rows, buffer)
    np.testing.assert_array_equal(rows, data[y0:y1])


def test_a_file_truncated_under_a_direct_read_is_named(fitsfile):
    data = RNG.integers(0, 65535, size=(40, 300)).astype(np.uint16)
    path = fitsfile("t.fits", data, IMAGETYP="Bias Frame")
    _direct_or_skip(path)
    frame = read_frame(path)
    with open(path, "r+b") as fh:
        fh.truncate(frame.data_offset + 10 * 600 + 5)
    reader = StripReader((frame, frame), direct=True)
    reader.read(0, 10)  # what is still there reads fine
    with pytest.raises(FrameReadError, match=r"t\.fits.*shorter than its header says"):
        reader.read(8, 12)


@pytest.mark.parametrize("ahead, dtype", [(1, np.uint16), (2, np.uint16), (3, np.uint16),
                                          (8, np.uint16), (3, np.float32)])
def test_frames_one_at_a_time_around_the_page_cache_are_every_frame_once(fitsfile, ahead,
                                                                          dtype):
    """The streaming reductions' reads: every frame's rows exactly once, whatever order the
    reads complete in, in buffers that are not written to once handed out (camera data
    read in place; other types through a staging copy)."""
    stack = RNG.integers(0, 65535, size=(7, 40, 300)).astype(np.uint16)
    frames = [read_frame(fitsfile(f"s{i}.fits", stack[i], IMAGETYP="Bias Frame"))
              for i in range(len(stack))]
    _direct_or_skip(frames[0].path)
    seen = []
    for rows in StripReader(tuple(frames), direct=True).frame_rows(5, 31, dtype, ahead):
        assert rows.dtype == dtype
        seen.append(rows.astype(np.uint16))
        time.sleep(0.002)  # the reads in flight finish while the caller holds this one
        np.testing.assert_array_equal(rows.astype(np.uint16), seen[-1])
    assert sorted(r.tobytes() for r in seen) == sorted(f[5:31].tobytes() for f in stack)


def test_a_failed_read_among_those_in_flight_is_named_and_leaves_none_running(fitsfile,
                                                                            monkeypatch):
    data = RNG.integers(0, 65535, size=(40, 300)).astype(np.uint16)
    paths = [fitsfile(f"r{i}.fits", data, IMAGETYP="Bias Frame") for i in range(12)]
    _direct_or_skip(paths[0])
    frames = tuple(read_frame(p) for p in paths)
    with open(paths[3], "r+b") as fh:
        fh.truncate(frames[3].data_offset + 10 * 600)
    running, lock, read = [0, 0], threading.Lock(), io.read_rows_direct

    def slow_read(*args, **kw):
        with lock:
            running[0] += 1
            running[1] += 1
        time.sleep(0.02)
        try:
            return read(*args, **kw)
        finally:
            with lock:
                running[0] -= 1

    monkeypatch.setattr(io, "read_rows_direct", slow_read)
    with pytest.raises(FrameReadError, match=r"r3\.fits.*shorter than its header says"):
        for _ in StripReader(frames, direct=True).frame_rows(0, 40, ahead=4):
            pass
    assert running[0] == 0  # nothing still writing into the buffers
    assert 4 <= running[1] < len(frames)  # in flight, but not every frame after the failure


@settings(max_examples=200, deadline=None)
@given(limit=st.integers(10**5, 10**10), ny=st.integers(1, 20000), nx=st.integers(1, 20000),
       workers=st.integers(1, 8))
def test_streaming_strips_around_the_page_cache_fit_the_budget_in_reads_of_direct_bytes(
        limit, ny, nx, workers):
    per_row = workers * nx * (io.STREAM_SUM_BYTES + 2 * io.STREAM_AHEAD
                              + io.RESULT_BYTES_PER_PIXEL)
    try:
        rows = io.stream_rows(limit, (ny, nx), workers, direct=True)
    except MemoryBudgetError:
        assert per_row > limit
        return
    cap, balanced = io.DIRECT_BYTES // (2 * nx), -(-ny // (4 * workers))
    assert rows >= 1
    assert rows == 1 or rows * per_row <= limit
    assert rows == 1 or rows * nx * 2 <= io.DIRECT_BYTES  # one read per frame, strip
    assert rows <= balanced  # every worker gets strips
    assert rows + 1 > min(limit // per_row, cap, balanced)  # the tallest of those
    cached = io.stream_rows(limit, (ny, nx), workers, direct=False)  # needs less
    assert cached == 1 or cached * nx * 10 <= io.STREAM_BYTES
    assert cached == 1 or cached * workers * nx * (8 + 2 + 16) <= limit
    assert cached <= balanced
    with pytest.raises(MemoryBudgetError, match=r"memory_limit .* cannot hold one row of the "
                                                r"running sums of dark_60s .* raise"):
        io.stream_rows(workers * nx * 26 - 1, (ny, nx), workers, direct=False,
                       what="dark_60s")


def test_groups_larger_than_half_the_available_memory_go_around_the_page_cache():
    available = io._memory_available()
    if available is None:
        pytest.skip("no /proc/meminfo")
    assert 10**6 < available < 10**15
    assert not io.exceeds_page_cache(available // 3)
    assert io.exceeds_page_cache(available)  # (margins: the OS figure moves between reads)


def test_read_ahead_stays_its_number_of_items_ahead(monkeypatch):
    """The OS is asked for each item in order, one file open per item, never more than
    `ahead` items beyond those started, and for nothing more once the run is over."""
    import threading
    import time

    asked: list[str] = []
    done = threading.Event()

    def advise(path, ranges):
        asked.append(path)
        if len(asked) == 6:
            done.set()

    monkeypatch.setattr(io, "_advise", advise)
    items = [(f"f{i}", [(0, 10), (20, 10)]) for i in range(10)]
    with io.ReadAhead(items, 3) as ahead:
        time.sleep(0.2)
        assert asked == ["f0", "f1", "f2"]
        for _ in range(3):
            ahead.started()
        assert done.wait(5)
        time.sleep(0.1)
        assert asked == [f"f{i}" for i in range(6)]
    assert asked == [f"f{i}" for i in range(6)]
