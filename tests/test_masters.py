"""Masters end to end through the API, judged against the simulator's ground truth.

Noise floor: a master that averages n frames has, per pixel, the standard deviation of one
frame divided by sqrt(n) (`Truth.noise_floor`); sigma clipping of Gaussian noise at 3 sigma
loses ~1 % of efficiency. A master is "right" when the RMS of (master - truth) over the frame
is within 1.3x the RMS of that floor and its mean offset is within a few standard errors.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from helpers import write_like

from stacker import MasterFrameCreator, Status
from stacker.kernels import make_kernel
from stacker.simulate import CameraModel, SimulationSpec, simulate

SHAPE = (40, 56)
N = 12


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    """A small simulated calibration set and its truth."""
    folder = tmp_path_factory.mktemp("raw")
    spec = SimulationSpec(camera=CameraModel(shape=SHAPE), n_bias=N, dark_exposures=(1.0, 60.0),
                          n_darks=N, flat_filters=("L",), flat_exposure=1.0, n_flats=N, seed=3,
                          cosmic_rate=20.0)
    truth = simulate(folder, spec)
    return folder, truth


def config(raw, tmp_path, **extra) -> dict:
    folder, _ = raw
    return {"master_frames": {"bias_dir": str(folder / "bias"), "darks_dir": str(folder / "darks"),
                              "flats_dir": str(folder / "flats"),
                              "output_dir": str(tmp_path / "out"), **extra}}


def built(status: Status) -> dict[str, dict]:
    return {m["job_id"]: m for m in status.details["masters"] if m["status"] == "built"}


def data(path, hdu=0) -> np.ndarray:
    with fits.open(path) as hdul:
        return np.asarray(hdul[hdu].data, dtype=np.float64)


def rms(x) -> float:
    return float(np.sqrt(np.mean(np.square(x))))


@pytest.fixture(scope="module")
def default_run(raw, tmp_path_factory):
    out = tmp_path_factory.mktemp("default")
    status = MasterFrameCreator(config(raw, out)).create_all_master_frames()
    return status


def test_every_master_is_within_the_noise_floor_of_the_truth(raw, default_run):
    _, truth = raw
    assert default_run.success, default_run.message
    masters = built(default_run)
    assert set(masters) == {"bias", "dark_1.000s", "dark_60.000s", "flat_L_1.000s"}
    for job_id, m in masters.items():
        image = data(m["path"])
        if m["kind"] == "bias":
            expected = truth.master_bias()
        elif m["kind"] == "dark":
            expected = truth.master_dark(m["exptime"])
        else:
            expected = truth.master_flat("mean")
        floor = truth.noise_floor(m["kind"], m["exptime"], N)
        error = image - expected
        assert rms(error) < 1.3 * rms(floor), job_id
        assert abs(error.mean()) < 5 * rms(floor) / np.sqrt(error.size) + 1e-3 * rms(floor) \
            or m["kind"] == "flat", job_id


def test_master_flat_is_normalized_and_dark_subtracted(default_run):
    flat = built(default_run)["flat_L_1.000s"]
    image = data(flat["path"])
    assert image.mean() == pytest.approx(1.0, abs=1e-6)
    with fits.open(flat["path"]) as hdul:
        h = hdul[0].header
        assert h["IMAGETYP"] == "MASTER FLAT" and h["NORMMETH"] == "mean"
        assert h["CALSUB"] == Path(built(default_run)["dark_1.000s"]["path"]).name
        assert h["DATAMEAN"] == pytest.approx(1.0, abs=1e-6)
        levels = hdul["INPUTS"].data["LEVEL"]
        # the twilight drift of the simulated flats is measured and scaled out
        assert levels.max() / levels.min() > 1.01


def test_header_provenance_and_frames_used(default_run, raw):
    m = built(default_run)["dark_60.000s"]
    with fits.open(m["path"]) as hdul:
        h = hdul[0].header
        assert (h["IMAGETYP"], h["EXPTIME"], h["NCOMBINE"]) == ("MASTER DARK", 60.0, N)
        assert (h["COMBMETH"], h["SIGLOW"], h["SIGHIGH"]) == ("sigma_clip", 3.0, 3.0)
        assert (h["SIGCENT"], h["SIGSTDEV"], h["SIGITER"]) == ("median", "std", "converge")
        assert h["CREATOR"].startswith("stacker ") and "DATE" in h and "CCD-TEMP" in h
        assert h["BITPIX"] == -32
        inputs = [c for c in h["HISTORY"] if str(c).startswith("input: ")]
        assert len(inputs) == N
        used = hdul["NUSED"].data
        assert used.max() <= N and used.min() >= 1
        assert h["NUSEDAVG"] == pytest.approx(used.mean())
        assert len(hdul["INPUTS"].data) == N


def _stack(paths) -> np.ndarray:
    return np.stack([data(p) for p in paths]).astype(np.float32)


@pytest.mark.parametrize("method", ["sigma_clip", "minmax", "median", "mean"])
def test_strips_make_exactly_the_master_of_the_whole_stack(raw, tmp_path, method):
    """The engine with a budget of a few rows equals the kernel applied to all frames at once."""
    folder, _ = raw
    cfg = config(raw, tmp_path, rejection_method=method, memory_limit=200_000,
                 num_workers=2)
    status = MasterFrameCreator(cfg).create_master_darks()
    assert status.success, status.message
    m = built(status)["dark_60.000s"]
    assert m["stats"]["rows_per_strip"] < SHAPE[0] // 4  # really strip by strip
    frames = sorted((folder / "darks").rglob("*.fits"))
    frames = [p for p in frames if fits.getheader(p)["EXPTIME"] == 60.0]
    kernel = make_kernel(method, **MasterFrameCreator(cfg).settings.kernel_options())
    image, used = kernel(_stack(frames))
    np.testing.assert_allclose(data(m["path"]), image, rtol=1e-6)
    np.testing.assert_array_equal(data(m["path"], "NUSED"), used)


def test_flat_equals_subtract_scale_combine_normalize_by_hand(raw, default_run):
    _folder, _ = raw
    flat = built(default_run)["flat_L_1.000s"]
    dark = data(built(default_run)["dark_1.000s"]["path"]).astype(np.float32)
    with fits.open(flat["path"]) as hdul:
        paths = list(hdul["INPUTS"].data["PATH"])
        scales = np.asarray(hdul["INPUTS"].data["SCALE"], dtype=np.float32)
    stack = (_stack(paths) - dark) * scales[:, None, None]
    image, _ = make_kernel("sigma_clip")(stack)
    np.testing.assert_allclose(data(flat["path"]), image / image.mean(), rtol=2e-5)


def test_sigma_clipping_removes_cosmic_rays_that_bias_a_plain_mean(raw, tmp_path):
    _, truth = raw
    results = {}
    for method in ("mean", "sigma_clip"):
        status = MasterFrameCreator(config(raw, tmp_path / method, rejection_method=method)
                                    ).create_master_darks()
        m = built(status)["dark_60.000s"]
        floor = truth.noise_floor("dark", 60.0, N)
        results[method] = np.abs(data(m["path"]) - truth.master_dark(60.0)) / floor
    hits_mean = int((results["mean"] > 8).sum())
    hits_clip = int((results["sigma_clip"] > 8).sum())
    assert hits_mean >= 5, "the simulated set should have cosmic rays in its 60 s darks"
    assert hits_clip <= hits_mean // 10


# --- every seed key does what it says -----------------------------------------------------


@pytest.mark.parametrize(("key", "value", "card", "expected"), [
    ("rejection_method", "minmax", "COMBMETH", "minmax"),
    ("sigma_threshold", 2.5, "SIGLOW", 2.5),
    ("sigma_low", 4.0, "SIGLOW", 4.0),
    ("sigma_high", 2.0, "SIGHIGH", 2.0),
    ("sigma_center", "mean", "SIGCENT", "mean"),
    ("sigma_stddev", "mad_std", "SIGSTDEV", "mad_std"),
    ("max_iterations", 1, "SIGITER", 1),
])
def test_rejection_keys_reach_the_kernel_and_the_header(raw, tmp_path, key, value, card,
                                                        expected):
    status = MasterFrameCreator(config(raw, tmp_path, **{key: value})).create_master_bias()
    with fits.open(built(status)["bias"]["path"]) as hdul:
        assert hdul[0].header[card] == expected


def test_nlow_nhigh_drop_that_many_values(raw, tmp_path):
    status = MasterFrameCreator(config(raw, tmp_path, rejection_method="minmax", nlow=2,
                                       nhigh=3)).create_master_bias()
    path = built(status)["bias"]["path"]
    with fits.open(path) as hdul:
        assert (hdul[0].header["NLOW"], hdul[0].header["NHIGH"]) == (2, 3)
        assert (hdul["NUSED"].data == N - 5).all()


def test_a_lower_sigma_threshold_rejects_more(raw, tmp_path):
    frac = []
    for sigma in (2.0, 3.0):
        status = MasterFrameCreator(config(raw, tmp_path / str(sigma), sigma_threshold=sigma)
                                    ).create_master_darks()
        frac.append(built(status)["dark_60.000s"]["stats"]["rejfrac"])
    assert frac[0] > frac[1] > 0


@pytest.mark.parametrize(("method", "card"), [("mean", "DATAMEAN"), ("median", "DATAMED"),
                                              ("max", "DATAMAX")])
def test_normalization_method(raw, tmp_path, method, card):
    status = MasterFrameCreator(config(raw, tmp_path, normalization_method=method)
                                ).create_all_master_frames()
    path = built(status)["flat_L_1.000s"]["path"]
    image = data(path)
    value = {"mean": image.mean(), "median": np.median(image), "max": image.max()}[method]
    assert value == pytest.approx(1.0, abs=2e-6)
    with fits.open(path) as hdul:
        assert hdul[0].header[card] == pytest.approx(1.0, abs=2e-6)
        assert hdul[0].header["NORMMETH"] == method


@pytest.mark.parametrize(("flags", "kinds"), [
    ({"create_master_bias": False}, {"dark", "flat"}),
    ({"create_master_darks": False, "create_master_flats": False}, {"bias"}),
    ({"create_master_flats": False}, {"bias", "dark"}),
])
def test_create_flags_choose_the_masters(raw, tmp_path, flags, kinds):
    status = MasterFrameCreator(config(raw, tmp_path, **flags)).create_all_master_frames()
    assert status.success
    assert {m["kind"] for m in built(status).values()} == kinds


def test_flats_alone_when_darks_are_off_still_subtract_a_dark(raw, tmp_path):
    status = MasterFrameCreator(config(raw, tmp_path, create_master_darks=False,
                                       create_master_bias=False)).create_all_master_frames()
    masters = built(status)
    assert set(masters) == {"dark_1.000s", "flat_L_1.000s"}  # only the dark the flat needs


def test_save_individual_masters_false_writes_one_multi_extension_file(raw, tmp_path):
    status = MasterFrameCreator(config(raw, tmp_path, save_individual_masters=False)
                                ).create_all_master_frames()
    assert status.success
    out = tmp_path / "out"
    fits_files = sorted(p.name for p in out.glob("master_*.fits"))
    assert len(fits_files) == 1 and fits_files[0].startswith("master_frames_")
    # The bad-pixel mask stays a file of its own beside the masters; metrics read the HDUs.
    assert len(list(out.glob("bad_pixel_mask_*.fits"))) == 1
    assert all(m["stats"]["metrics"]["frames_used"] > 0 for m in status.details["masters"])
    assert not [p for p in out.iterdir() if p.name.startswith(".") and p.name != ".stacker.lock"]
    with fits.open(out / fits_files[0]) as hdul:
        hdul.verify("exception")
        names = [h.name for h in hdul[1:]]
        assert names == ["BIAS", "BIAS_NUSED", "DARK_1.000S", "DARK_1.000S_NUSED",
                         "DARK_60.000S", "DARK_60.000S_NUSED", "FLAT_L_1.000S",
                         "FLAT_L_1.000S_NUSED"]
        assert hdul["FLAT_L_1.000S"].data.mean() == pytest.approx(1.0, abs=1e-6)
        assert hdul["DARK_60.000S"].header["IMAGETYP"] == "MASTER DARK"
        assert hdul["FLAT_L_1.000S"].header["CALSUB"] == "DARK_1.000S"


def test_input_dir_sorted_by_imagetyp_gives_the_same_masters(raw, tmp_path, default_run):
    folder, _ = raw
    flat_layout = tmp_path / "all"
    for p in folder.rglob("*.fits"):
        shutil.copy(p, flat_layout / p.name) if flat_layout.exists() else (
            flat_layout.mkdir(), shutil.copy(p, flat_layout / p.name))
    status = MasterFrameCreator({"master_frames": {"input_dir": str(flat_layout),
                                                   "output_dir": str(tmp_path / "out")}}
                                ).create_all_master_frames()
    assert status.success
    a, b = built(status), built(default_run)
    assert set(a) == set(b)
    for job_id in a:
        np.testing.assert_allclose(data(a[job_id]["path"]), data(b[job_id]["path"]), rtol=1e-6)


def test_memory_limit_changes_the_strips_not_the_result(raw, tmp_path):
    images, rows = [], []
    for limit in ("10kB", "1GB"):
        status = MasterFrameCreator(config(raw, tmp_path / limit, memory_limit=limit,
                                           num_workers=1)).create_master_bias()
        m = built(status)["bias"]
        images.append(data(m["path"]))
        rows.append(m["stats"]["rows_per_strip"])
    assert rows[0] < rows[1]
    np.testing.assert_array_equal(images[0], images[1])


def test_a_budget_below_one_row_fails_before_reading(raw, tmp_path):
    status = MasterFrameCreator(config(raw, tmp_path, memory_limit=1000)).create_master_bias()
    assert not status.success
    assert "cannot hold one row" in status.message and status.details["exit_code"] == 2
    assert not list((tmp_path / "out").glob("*.fits"))


def test_the_mean_of_camera_frames_needs_a_row_of_sums_not_a_row_of_every_frame(raw,
                                                                                 tmp_path):
    """The mean and min/max of uint16 frames add them one at a time to running sums: a
    budget below one row of all N frames still builds them (in one-row strips, the same
    masters), and refuses the sigma clip, which holds every frame's rows."""
    limit = 5000  # a row of the 12 bias frames: 2 x 56 x (12 x 4 + 16) = 7168 B; of sums 2912
    for method in ("mean", "minmax"):
        small = MasterFrameCreator(config(raw, tmp_path / method, rejection_method=method,
                                          memory_limit=limit, num_workers=2)
                                   ).create_master_bias()
        assert small.success, small.message
        big = MasterFrameCreator(config(raw, tmp_path / f"{method}-1GB",
                                        rejection_method=method, num_workers=2)
                                 ).create_master_bias()
        mine, theirs = built(small)["bias"], built(big)["bias"]
        assert mine["stats"]["rows_per_strip"] == 1 < theirs["stats"]["rows_per_strip"]
        np.testing.assert_array_equal(data(mine["path"]), data(theirs["path"]))
        np.testing.assert_array_equal(data(mine["path"], 1), data(theirs["path"], 1))
    clip = MasterFrameCreator(config(raw, tmp_path / "clip", memory_limit=limit,
                                     num_workers=2)).create_master_bias()
    assert not clip.success and "cannot hold one row of all 12 frames" in clip.message


def test_min_frames_refuses_small_groups_and_the_rest_is_built(raw, tmp_path):
    status = MasterFrameCreator(config(raw, tmp_path, min_frames=N + 1)).create_master_darks()
    assert not status.success and status.data["files"] == []
    assert f"min_frames is {N + 1}" in status.message


def test_quality_control_leaves_out_a_blank_frame(raw, tmp_path):
    folder, _ = raw
    bias = tmp_path / "bias"
    shutil.copytree(folder / "bias", bias)
    write_like(sorted(bias.glob("*.fits"))[0], bias / "blank.fits",
               data=np.zeros(SHAPE, np.uint16))
    cfg = config(raw, tmp_path)
    cfg["master_frames"]["bias_dir"] = str(bias)
    on = MasterFrameCreator(cfg).create_master_bias()
    m = built(on)["bias"]
    verdicts = {Path(f["path"]).name: f["verdict"] for f in m["stats"]["frames"]}
    assert verdicts["blank.fits"].startswith("all-zero frame")
    with fits.open(m["path"]) as hdul:
        assert hdul[0].header["NCOMBINE"] == N
    cfg["master_frames"].update(quality_control=False, output_dir=str(tmp_path / "off"))
    off = MasterFrameCreator(cfg).create_master_bias()
    with fits.open(built(off)["bias"]["path"]) as hdul:
        assert hdul[0].header["NCOMBINE"] == N + 1
    # Without quality control there are no master metrics and no bad-pixel mask either;
    # the report is still written.
    assert "metrics" in m["stats"] and "metrics" not in built(off)["bias"]["stats"]
    assert not list((tmp_path / "off").glob("bad_pixel_mask_*"))
    assert (tmp_path / "off" / "report.json").exists()


def test_log_file_in_output_dir_or_log_dir(raw, tmp_path):
    MasterFrameCreator(config(raw, tmp_path)).create_master_bias()
    assert len(list((tmp_path / "out").glob("master_frames_*.log"))) == 1
    MasterFrameCreator(config(raw, tmp_path, log_dir=str(tmp_path / "logs"))).create_master_bias()
    log = next((tmp_path / "logs").glob("master_frames_*.log")).read_text()
    assert "bias" in log and "plan" in log


# --- API and statuses ---------------------------------------------------------------------


def test_status_objects_and_get_status(raw, tmp_path):
    creator = MasterFrameCreator(config(raw, tmp_path))
    status = creator.create_master_darks()
    assert isinstance(status, Status) and status.success and status.level == "success"
    assert status.is_success and not status.is_error and bool(status)
    assert all(Path(p).exists() for p in status.data) and len(status.data) == 2
    assert status.details["n_master_darks"] == 2
    assert status.details["exposure_times"]["darks"] == [1.0, 60.0]
    flats = creator.create_master_flats()
    assert flats.success and len(flats.data) == 1
    state = creator.get_status()
    assert (state["n_master_darks"], state["n_master_flats"], state["runs"]) == (2, 1, 2)
    assert state["exposure_times"] == {"darks": [1.0, 60.0], "flats": [1.0]}
    assert state["settings"]["rejection_method"] == "sigma_clip"
    assert set(state["statistics"]) == {"dark_1.000s", "dark_60.000s", "flat_L_1.000s"}


def test_flats_alone_reuse_the_master_dark_already_in_the_output_dir(raw, tmp_path):
    darks = MasterFrameCreator(config(raw, tmp_path)).create_master_darks()
    dark_1s = built(darks)["dark_1.000s"]["path"]
    flats = MasterFrameCreator(config(raw, tmp_path)).create_master_flats()
    assert flats.success and list(built(flats)) == ["flat_L_1.000s"]
    with fits.open(built(flats)["flat_L_1.000s"]["path"]) as hdul:
        assert hdul[0].header["CALSUB"] == Path(dark_1s).name


def test_error_status_when_nothing_is_found(tmp_path):
    (tmp_path / "empty").mkdir()
    status = MasterFrameCreator({"master_frames": {"darks_dir": str(tmp_path / "empty"),
                                                   "output_dir": str(tmp_path / "out")}}
                                ).create_master_darks()
    assert not status.success and status.level == "error" and status.is_error
    assert status.message.startswith("No input files found")
    assert str(tmp_path / "empty") in status.message and ".fits" in status.message
    assert status.data["type"] == "InputError"


def test_inputs_are_never_modified(raw, tmp_path):
    folder, _ = raw
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in (folder / "bias").glob("*")}
    MasterFrameCreator(config(raw, tmp_path)).create_master_bias()
    after = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in (folder / "bias").glob("*")}
    assert before == after


def test_tile_compressed_frames_give_the_same_master(raw, tmp_path, default_run):
    folder, _ = raw
    packed = tmp_path / "bias_fz"
    packed.mkdir()
    for p in sorted((folder / "bias").glob("*.fits")):
        with fits.open(p) as hdul:
            fits.HDUList([fits.PrimaryHDU(), fits.CompImageHDU(hdul[0].data, hdul[0].header)]
                         ).writeto(packed / (p.name + ".fz"))
    cfg = config(raw, tmp_path)
    cfg["master_frames"]["bias_dir"] = str(packed)
    status = MasterFrameCreator(cfg).create_master_bias()
    np.testing.assert_array_equal(data(built(status)["bias"]["path"]),
                                  data(built(default_run)["bias"]["path"]))


def test_num_workers_does_not_change_the_result(raw, tmp_path):
    images = []
    for w in (1, 2):
        status = MasterFrameCreator(config(raw, tmp_path / str(w), num_workers=w,
                                           memory_limit="300kB")).create_master_bias()
        images.append(data(built(status)["bias"]["path"]))
    np.testing.assert_array_equal(images[0], images[1])


def test_a_given_logger_gets_records_at_its_own_level(raw, tmp_path):
    import logging

    class Collect(logging.Handler):
        def __init__(self):
            super().__init__()
            self.records = []

        def emit(self, record):
            self.records.append(record)

    mine = logging.getLogger("observatory")
    mine.setLevel(logging.INFO)
    mine.propagate = False
    collect = Collect()
    mine.addHandler(collect)
    try:
        MasterFrameCreator(config(raw, tmp_path), logger=mine).create_master_bias()
    finally:
        mine.removeHandler(collect)
    levels = {r.levelname for r in collect.records}
    assert "INFO" in levels and "DEBUG" not in levels
    log = next((tmp_path / "out").glob("master_frames_*.log")).read_text()
    assert "DEBUG" in log  # the file log keeps the details


@pytest.mark.parametrize("qc, method, direct", [(True, "sigma_clip", False),
                                                (False, "sigma_clip", False),
                                                (False, "sigma_clip", True),
                                                (False, "mean", True)])
def test_a_file_damaged_after_the_inventory(raw, tmp_path, qc, method, direct, request):
    """With quality control the frame is left out and named; without it the master fails
    naming the file and is absent (no partial file), also when the frames are read around
    the page cache, several at a time. Other masters are built either way."""
    from stacker.engine import run_plan

    if direct:
        request.getfixturevalue("around_the_page_cache")()
    folder, _ = raw
    darks = tmp_path / "darks"
    shutil.copytree(folder / "darks", darks)
    cfg = config(raw, tmp_path, quality_control=qc, rejection_method=method, num_workers=2)
    cfg["master_frames"]["darks_dir"] = str(darks)
    creator = MasterFrameCreator(cfg)
    plan = creator.plan(["dark"])
    victim = sorted((darks / "60s").glob("*.fits"))[3]
    with open(victim, "r+b") as fh:
        fh.truncate(4000)  # after the inventory read its header
    results = {r.job_id: r for r in run_plan(plan, creator.settings)}
    assert results["dark_1.000s"].status == "built"
    job = results["dark_60.000s"]
    if qc:
        assert job.status == "built"
        verdicts = {Path(f["path"]).name: f["verdict"] for f in job.stats["frames"]}
        assert "shorter than its header says" in verdicts[victim.name]
        with fits.open(job.path) as hdul:
            assert hdul[0].header["NCOMBINE"] == len(plan.jobs[1].frames) - 1
        return
    assert job.status == "failed" and victim.name in job.error
    assert not list((tmp_path / "out").glob("master_dark_60*"))
    assert not list((tmp_path / "out").glob(".*.part"))


def test_progress_counts_every_strip_of_every_master(raw, tmp_path):
    seen: dict[str, list[tuple[int, int]]] = {}
    creator = MasterFrameCreator(config(raw, tmp_path, memory_limit="64kB", num_workers=2),
                                 progress=lambda job, done, total: seen.setdefault(
                                     job, []).append((done, total)))
    status = creator.create_all_master_frames()
    assert status.success, status.message
    assert set(seen) == set(built(status))
    for job_id, calls in seen.items():
        total = calls[-1][1]
        assert total > 1, job_id  # a small budget: several strips
        assert [d for d, _ in calls] == list(range(total + 1)), job_id  # 0, 1, ..., total


@pytest.fixture
def around_the_page_cache(monkeypatch, tmp_path):
    """Call it, and every group is read as if it were larger than the memory free for the
    page cache (the frames of a real run: the test's are tiny). Skips where the file system
    has no O_DIRECT, where the run would quietly read through the cache and test nothing."""
    from stacker import engine, io

    probe = tmp_path / "probe"
    probe.write_bytes(bytes(8192))
    fd = io._open_direct(probe)
    if fd is None:
        pytest.skip("no O_DIRECT on this file system")
    os.close(fd)
    return lambda: monkeypatch.setattr(engine, "exceeds_page_cache", lambda nbytes: True)


@pytest.mark.parametrize("method", ["sigma_clip", "minmax", "median", "mean"])
def test_reading_around_the_page_cache_builds_the_same_masters(raw, tmp_path, default_run,
                                                               around_the_page_cache, method):
    """O_DIRECT reads, strips read ahead into a second block per worker, taller strips: the
    same masters, flats (dark subtracted and scaled as each frame is read) included."""
    import threading

    reference = MasterFrameCreator(config(raw, tmp_path / "cache", rejection_method=method,
                                          memory_limit="200kB", num_workers=2)
                                   ).create_all_master_frames()
    around_the_page_cache()
    status = MasterFrameCreator(config(raw, tmp_path / "direct", rejection_method=method,
                                       memory_limit="200kB", num_workers=2)
                                ).create_all_master_frames()
    mine, theirs = built(status), built(reference)
    assert set(mine) == set(theirs) and len(mine) == 4
    for job, m in mine.items():
        assert m["stats"]["read_around_page_cache"] is True
        assert m["stats"]["rows_per_strip"] < SHAPE[0] // 4  # several strips, read ahead
        np.testing.assert_array_equal(data(m["path"]), data(theirs[job]["path"]))
        np.testing.assert_array_equal(data(m["path"], 1), data(theirs[job]["path"], 1))
    assert not [t for t in threading.enumerate() if t.name.startswith("stacker-ahead")]


@pytest.mark.parametrize("limit", ["50kB", "300kB", "1GB"])
def test_the_block_read_ahead_counts_against_the_memory_budget(raw, tmp_path, limit):
    from stacker.engine import strip_rows
    from stacker.io import DIRECT_STRIP_CAP, READ_BYTES_PER_VALUE, RESULT_BYTES_PER_PIXEL

    creator = MasterFrameCreator(config(raw, tmp_path, memory_limit=limit, num_workers=2))
    job = creator.plan(["dark"]).jobs[0]
    s = creator.settings
    n, nx = len(job.frames), job.shape[1]
    held = READ_BYTES_PER_VALUE + make_kernel(s.rejection_method,
                                              **s.kernel_options()).bytes_per_value
    cache, direct = strip_rows(job, s), strip_rows(job, s, direct=True)
    # two blocks per worker, within the budget
    assert 2 * nx * (n * (held + READ_BYTES_PER_VALUE) + RESULT_BYTES_PER_PIXEL) * direct \
        <= s.memory_limit
    assert n * nx * held * direct <= DIRECT_STRIP_CAP
    if limit == "50kB":
        assert direct < cache
