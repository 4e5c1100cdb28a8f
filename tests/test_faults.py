"""Fault injection: folders straight from the camera, with every kind of bad file in them.

Each bad file is real (written with astropy, or damaged bytes of a real frame). The run goes
through the CLI as a user runs it; every bad file must be named with its reason, the masters
must be built from the rest and equal (pixel for pixel) the masters of the clean folders.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from helpers import config_file, read_masters, run_stacker, write_like

from stacker.simulate import CameraModel, SimulationSpec, simulate

SHAPE = (24, 32)




def a_dark(raw: Path, exptime: str = "5s") -> Path:
    return sorted((raw / "darks" / exptime).glob("*.fits"))[0]


def inject(raw: Path) -> dict[str, str]:
    """Put bad files into a copy of clean folders; returns {file name: expected reason}."""
    darks = raw / "darks" / "5s"
    good = a_dark(raw)
    size = good.stat().st_size
    expect: dict[str, str] = {}

    (darks / "truncated_5s.fits").write_bytes(good.read_bytes()[: size - 2000])
    expect["truncated_5s.fits"] = "truncated"
    (darks / "notes_5s.fits").write_text("SIMPLE? no: these are my observing notes\n" * 100)
    expect["notes_5s.fits"] = "not a readable FITS file"
    (darks / "preview.jpg").write_bytes(b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + bytes(2000))
    expect["preview.jpg"] = "not a FITS file name"
    (darks / "empty_5s.fits").write_bytes(b"")
    expect["empty_5s.fits"] = "empty file"
    # Above the 5s folder: nothing says its exposure.
    write_like(good, raw / "darks" / "otherexp.fits", EXPTIME=None, EXPOSURE=None)
    expect["otherexp.fits"] = "no EXPTIME"
    write_like(good, darks / "badexp_5s.fits", EXPTIME="five")
    expect["badexp_5s.fits"] = "EXPTIME"
    rng = np.random.default_rng(3)
    small = rng.integers(900, 1100, (SHAPE[0] // 2, SHAPE[1] // 2)).astype(np.uint16)
    write_like(good, darks / "othershape_5s.fits", data=small)
    expect["othershape_5s.fits"] = "shape 16x12 differs"
    write_like(good, darks / "zeros_5s.fits", data=np.zeros(SHAPE, np.uint16))
    expect["zeros_5s.fits"] = "all-zero frame"
    write_like(good, darks / "constant_5s.fits", data=np.full(SHAPE, 1000, np.uint16))
    expect["constant_5s.fits"] = "constant frame"
    nan = np.full(SHAPE, np.nan, np.float32)
    nan[0, :5] = 1000.0
    nan[1, :3] = np.inf
    write_like(good, darks / "nan_5s.fits", data=nan)
    expect["nan_5s.fits"] = "finite"
    # A compressed frame whose tile data is damaged: its header reads, its pixels do not.
    comp = darks / "broken_5s.fits.fz"
    with fits.open(good) as hdul:
        fits.HDUList([fits.PrimaryHDU(), fits.CompImageHDU(hdul[0].data, hdul[0].header)]
                     ).writeto(comp)
    blob = bytearray(comp.read_bytes())
    with fits.open(comp) as hdul:
        start = hdul[1].fileinfo()["datLoc"]
    blob[start:start + 64] = b"\x00" * 64  # the tile table: offsets and sizes of every tile
    blob[start + 64:] = bytes(len(blob) - start - 64)
    comp.write_bytes(bytes(blob))
    expect["broken_5s.fits.fz"] = "cannot be decompressed"
    # A flat from another camera mode: binned 2x2 and half the size.
    flat = sorted((raw / "flats").rglob("*.fits"))[0]
    write_like(flat, raw / "flats" / "binned_flat.fits",
               data=rng.integers(20000, 21000, (SHAPE[0] // 2, SHAPE[1] // 2)).astype(np.uint16),
               XBINNING=2, YBINNING=2)
    # A symbolic link to itself and a folder link back up: neither may hang the scan.
    os.symlink("loop_5s.fits", darks / "loop_5s.fits")
    expect["loop_5s.fits"] = "symbolic link loop"
    os.symlink("..", darks / "up")
    return expect


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    clean = tmp_path_factory.mktemp("clean")
    simulate(clean, SimulationSpec(camera=CameraModel(shape=SHAPE), n_bias=5,
                                   dark_exposures=(1.0, 5.0), n_darks=5, n_flats=5, seed=11))
    dirty = tmp_path_factory.mktemp("dirty") / "raw"
    shutil.copytree(clean, dirty)
    expect = inject(dirty)
    return clean, dirty, expect


@pytest.fixture(scope="module")
def runs(folders, tmp_path_factory):
    clean, dirty, _ = folders
    tmp = tmp_path_factory.mktemp("runs")
    out = {}
    for name, raw in (("clean", clean), ("dirty", dirty)):
        before = {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in raw.rglob("*")
                  if p.is_file() and not p.is_symlink()}
        cfg = config_file(tmp, raw, tmp / name)
        proc = run_stacker("masters", "--config", str(cfg), cwd=tmp)
        after = {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in before}
        out[name] = (proc, tmp / name, before == after)
    return out


def masters(folder: Path) -> dict[str, np.ndarray]:
    return {job_id: image for job_id, (_, image) in read_masters(folder).items()}


def test_clean_run_builds_everything(runs):
    proc, out, _ = runs["clean"]
    assert proc.returncode == 0, proc.stderr
    assert set(masters(out)) == {"bias", "dark_1.000s", "dark_5.000s", "flat_L_1.000s"}


def test_every_bad_file_is_named_with_its_reason(runs, folders):
    _, _, expect = folders
    proc, _, _ = runs["dirty"]
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.splitlines()
    for name, reason in expect.items():
        said = [ln for ln in lines if name in ln]
        assert said, f"{name} is not named in:\n{proc.stderr}"
        assert any(reason in ln for ln in said), f"{name}: expected {reason!r} in {said}"


def test_the_report_counts_the_bad_files(runs, folders):
    import json

    _, _, expect = folders
    _, out, _ = runs["dirty"]
    report = json.loads((out / "report.json").read_text())
    skipped = {Path(s["path"]).name for s in report["inventory"]["skipped_files"]}
    rejected = {Path(f["path"]).name for m in report["masters"] for f in m["frames"]
                if f["verdict"] != "ok"}
    assert skipped | rejected == set(expect)
    assert report["counts"]["n_skipped_files"] == len(skipped)
    assert report["counts"]["n_rejected_frames"] == len(rejected) == 4
    assert report["counts"]["n_failed"] == 1  # the lone binned flat


def test_masters_from_the_rest_equal_the_clean_masters(runs):
    proc, out, _ = runs["dirty"]
    clean = masters(runs["clean"][1])
    # The binned flat forms a group of its own (refused), so the good flat's id says bin1x1.
    dirty = {k.replace("_bin1x1", ""): v for k, v in masters(out).items()}
    assert set(dirty) == set(clean), proc.stderr
    for job_id, image in clean.items():
        np.testing.assert_array_equal(dirty[job_id], image, err_msg=job_id)


def test_exit_code_says_some_were_not_built(runs):
    proc, _, _ = runs["dirty"]
    # The lone binned flat is a group of its own that cannot be built: exit code 1.
    assert proc.returncode == 1, proc.stderr
    assert "bin2x2" in proc.stderr


def test_inputs_are_never_modified(runs):
    assert runs["clean"][2] and runs["dirty"][2]


def test_no_partial_files_left(runs):
    for _, out, _ in runs.values():
        assert not list(out.glob(".*.part")), list(out.iterdir())
        assert not list(out.glob(".stacker-work-*"))


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_unreadable_file_is_named(folders, tmp_path):
    clean, _, _ = folders
    raw = tmp_path / "raw"
    shutil.copytree(clean, raw)
    locked = a_dark(raw)
    locked.chmod(0)
    proc = run_stacker("masters", "--config", str(config_file(tmp_path, raw, tmp_path / "out")))
    assert "permission denied" in proc.stderr and locked.name in proc.stderr
