"""Reruns, interruptions, concurrent runs and write errors: nothing lost, nothing half-written.

Every case runs the real command in a subprocess on real FITS files: a rerun skips what is
up to date, a SIGKILL mid-write leaves only complete masters (the next run cleans up and
finishes), a second run on a busy folder stops with exit code 2, a write error fails the
master cleanly.
"""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from helpers import config_file, read_masters, run_stacker

from stacker.outdir import FINGERPRINT_CARD, OutputLock
from stacker.simulate import CameraModel, SimulationSpec, simulate

IDS = {"bias", "dark_1.000s", "dark_5.000s", "flat_L_1.000s"}




@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    folder = tmp_path_factory.mktemp("raw")
    simulate(folder, SimulationSpec(camera=CameraModel(shape=(24, 32)), n_bias=5,
                                    dark_exposures=(1.0, 5.0), n_darks=5, n_flats=5, seed=4))
    return folder


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    """Frames large enough that a build takes a while: something to interrupt."""
    folder = tmp_path_factory.mktemp("big")
    simulate(folder, SimulationSpec(camera=CameraModel(shape=(768, 1024)), n_bias=12,
                                    dark_exposures=(1.0, 5.0), n_darks=12, n_flats=12, seed=8))
    return folder


def test_rerun_skips_up_to_date_masters_and_force_rebuilds(raw, tmp_path):
    cfg = config_file(tmp_path, raw, tmp_path / "out")
    first = run_stacker("masters", "--config", str(cfg))
    assert first.returncode == 0, first.stderr
    before = {k: (p, p.stat().st_mtime_ns) for k, (p, _) in read_masters(tmp_path / "out").items()}
    assert set(before) == IDS
    for path, _ in before.values():
        assert len(fits.getheader(path)[FINGERPRINT_CARD]) == 40

    second = run_stacker("masters", "--config", str(cfg))
    assert second.returncode == 0, second.stderr
    assert second.stderr.count("up to date") >= len(IDS)
    assert "0 masters built" in second.stderr and "4 already up to date" in second.stderr
    after = {k: (p, p.stat().st_mtime_ns) for k, (p, _) in read_masters(tmp_path / "out").items()}
    assert after == before  # same files, untouched
    assert sorted(second.stdout.split()) == sorted(str(p) for p, _ in before.values())

    time.sleep(1.1)  # a new timestamp, so the rebuilt masters get new names
    forced = run_stacker("masters", "--config", str(cfg), "--force")
    assert forced.returncode == 0, forced.stderr
    assert "same inputs and settings" not in forced.stderr  # no master kept
    assert len(list((tmp_path / "out").glob("master_*.fits"))) == 2 * len(IDS)


def test_changed_inputs_rebuild_only_their_masters(raw, tmp_path):
    import shutil

    copy = tmp_path / "raw"
    shutil.copytree(raw, copy)
    cfg = config_file(tmp_path, copy, tmp_path / "out")
    assert run_stacker("masters", "--config", str(cfg)).returncode == 0
    time.sleep(1.1)
    # A new 1 s dark: its master changes, and so does the flat that subtracts it.
    extra = copy / "darks" / "1s" / "dark_1s_extra.fits"
    shutil.copy(sorted((copy / "darks" / "1s").glob("*.fits"))[0], extra)
    rerun = run_stacker("masters", "--config", str(cfg))
    assert rerun.returncode == 0, rerun.stderr
    assert "2 masters built" in rerun.stderr and "2 already up to date" in rerun.stderr
    names = [p.name for p in (tmp_path / "out").glob("master_*.fits")]
    assert sum(n.startswith("master_dark_1.000s") for n in names) == 2
    assert sum(n.startswith("master_flat") for n in names) == 2
    assert sum(n.startswith("master_dark_5.000s") for n in names) == 1
    # A setting that changes pixels rebuilds everything.
    other = run_stacker("masters", "--config", str(cfg), "--rejection-method", "minmax")
    assert "4 masters built" in other.stderr, other.stderr


def test_a_second_run_on_a_busy_folder_stops_with_exit_code_2(raw, tmp_path):
    out = tmp_path / "out"
    with OutputLock(out):
        proc = run_stacker("masters", "--config", str(config_file(tmp_path, raw, out)))
    assert proc.returncode == 2, proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("stacker: error: output folder") and "in use by stacker pid" in line
    assert not list(out.glob("master_*.fits"))
    # Once the holder is gone, the folder is free again.
    assert run_stacker("masters", "--config", str(config_file(tmp_path, raw, out))).returncode == 0


def test_sigkill_mid_write_leaves_only_complete_masters_and_a_rerun_finishes(big, tmp_path):
    clean_out = tmp_path / "clean"
    clean = run_stacker("masters", "--config", str(config_file(tmp_path, big, clean_out,
                                                      num_workers=1)))
    assert clean.returncode == 0, clean.stderr

    # The kill lands between seeing a temp file and its rename with some luck: a few tries
    # until one leaves a half-written master behind.
    for attempt in range(5):
        out = tmp_path / f"out{attempt}"
        cfg = config_file(tmp_path, big, out, num_workers=1)
        killed = _kill_while_writing(cfg, out)
        if list(out.glob(".*.part")):
            break
    assert killed, "the run finished before it could be interrupted"
    left = read_masters(out)
    assert 1 <= len(left) < len(IDS)
    for _, (path, data) in left.items():  # each one complete and readable
        assert data.shape == (768, 1024) and np.isfinite(data).all()
        assert FINGERPRINT_CARD in fits.getheader(path)
    assert list(out.glob(".*.part"))  # the interrupted one: a temp file, never a master

    rerun = run_stacker("masters", "--config", str(cfg))
    assert rerun.returncode == 0, rerun.stderr
    assert "left by an interrupted run" in rerun.stderr
    assert f"{len(left)} already up to date" in rerun.stderr
    assert not list(out.glob(".*.part"))
    final, reference = read_masters(out), read_masters(clean_out)
    assert set(final) == set(reference) == IDS
    for job_id, (_, data) in reference.items():
        np.testing.assert_array_equal(final[job_id][1], data, err_msg=job_id)


def _kill_while_writing(cfg: Path, out: Path) -> bool:
    """Start a run and SIGKILL it once one master is complete and another is being written."""
    proc = subprocess.Popen([sys.executable, "-m", "stacker", "masters", "--config", str(cfg)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    killed = False
    while time.monotonic() < deadline and proc.poll() is None:
        parts = list(out.glob(".*.part")) if out.exists() else []
        if parts and list(out.glob("master_*.fits")):
            os.kill(proc.pid, signal.SIGKILL)
            killed = True
            break
        time.sleep(0.002)
    proc.wait()
    assert not killed or proc.returncode == -signal.SIGKILL
    return killed


def _limit_file_size():
    # What a full disk looks like to the writer: writes past 64 kB fail (EFBIG, no signal).
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64_000, 64_000))


def test_a_write_error_fails_the_master_and_leaves_no_partial_file(big, tmp_path):
    out = tmp_path / "out"
    cfg = config_file(tmp_path, big, out, log_dir=str(tmp_path / "logs"))
    proc = run_stacker("masters", "--config", str(cfg), preexec_fn=_limit_file_size)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "file size limit exceeded while writing" in proc.stderr
    assert "partial file was removed" in proc.stderr
    assert not list(out.glob("master_*")) and not list(out.glob(".*.part"))


def test_an_output_folder_that_is_a_file_is_a_usage_error(raw, tmp_path):
    blocker = tmp_path / "out"
    blocker.write_text("not a folder")
    proc = run_stacker("masters", "--config", str(config_file(tmp_path, raw, blocker)))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        f"stacker: error: master_frames.output_dir {blocker} is a file, not a folder; "
        "choose a folder")


def test_output_inside_an_input_folder_is_refused(raw, tmp_path):
    cfg = config_file(tmp_path, raw, raw / "darks" / "out")
    proc = run_stacker("masters", "--config", str(cfg))
    assert proc.returncode == 2
    assert "is inside master_frames.darks_dir" in proc.stderr
    assert not (raw / "darks" / "out").exists()


def test_a_rerun_keeps_the_bad_pixel_mask_and_rewrites_the_report(raw, tmp_path):
    cfg = config_file(tmp_path, raw, tmp_path / "out")
    assert run_stacker("masters", "--config", str(cfg)).returncode == 0
    masks = list((tmp_path / "out").glob("bad_pixel_mask_*.fits"))
    time.sleep(1.1)
    rerun = run_stacker("masters", "--config", str(cfg))
    assert "bad-pixel mask: up to date" in rerun.stderr
    assert list((tmp_path / "out").glob("bad_pixel_mask_*.fits")) == masks
    import json

    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["counts"]["n_up_to_date"] == len(IDS)
    assert all(m["metrics"] for m in report["masters"])  # measured again from the files


def test_plan_shows_which_masters_are_up_to_date(raw, tmp_path):
    cfg = config_file(tmp_path, raw, tmp_path / "out")
    before = run_stacker("plan", "--config", str(cfg))
    assert "up to date" not in before.stdout
    assert run_stacker("masters", "--config", str(cfg)).returncode == 0
    after = run_stacker("plan", "--config", str(cfg))
    assert after.returncode == 0
    assert after.stdout.count("up to date: master_") == len(IDS)
