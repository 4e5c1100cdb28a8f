"""Frame validation: every rejection named with its reason, against simulated faults."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from helpers import write_like
from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from stacker import MasterFrameCreator
from stacker.qc import QC_SUBSAMPLE_FROM, _median, clipped_stats, measure
from stacker.simulate import CameraModel, SimulationSpec, simulate

SHAPE = (48, 64)
N = 10


@pytest.fixture(scope="module")
def faulty(tmp_path_factory):
    """Darks with one light leak, flats with one cloud, and the truth naming them."""
    folder = tmp_path_factory.mktemp("faulty")
    spec = SimulationSpec(camera=CameraModel(shape=SHAPE), n_bias=N, dark_exposures=(30.0,),
                          n_darks=N, n_flats=N, seed=11, light_leak_darks=1, cloudy_flats=1)
    return folder, simulate(folder, spec)


def run(folder: Path, out: Path, what: str = "all", **keys):
    cfg = {"master_frames": {"bias_dir": str(folder / "bias"), "darks_dir": str(folder / "darks"),
                             "flats_dir": str(folder / "flats"), "output_dir": str(out), **keys}}
    creator = MasterFrameCreator(cfg)
    return {"all": creator.create_all_master_frames, "bias": creator.create_master_bias,
            "dark": creator.create_master_darks}[what]()


def verdicts(status, job_id: str) -> dict[str, dict]:
    master = next(m for m in status.details["masters"] if m["job_id"] == job_id)
    return {Path(f["path"]).name: f for f in master["stats"]["frames"]}


def test_the_light_leak_dark_and_the_cloudy_flat_are_rejected_with_their_z_score(faulty,
                                                                                 tmp_path):
    folder, truth = faulty
    status = run(folder, tmp_path / "out")
    assert status.success
    darks = verdicts(status, "dark_30.000s")
    leak = truth.params["defects"][0]
    assert darks[leak]["verdict"].startswith("outlier: level")
    assert darks[leak]["z_level"] > 50 and f"z-score {darks[leak]['z_level']:.1f}" in \
        darks[leak]["verdict"]
    assert [n for n, f in darks.items() if f["verdict"] != "ok"] == [leak]
    flats = verdicts(status, "flat_L_1.000s")
    cloud = truth.params["defects"][1]
    assert flats[cloud]["verdict"].startswith("outlier: its shape departs")
    assert flats[cloud]["z_shape"] > 5
    # The twilight drift (3 % in level) is not an outlier: only the cloud is.
    assert [n for n, f in flats.items() if f["verdict"] != "ok"] == [cloud]
    log = next((tmp_path / "out").glob("master_frames_*.log")).read_text()
    assert f"left out {folder / 'darks' / '30s' / leak}: outlier: level" in log
    with fits.open(next(m["path"] for m in status.details["masters"]
                        if m["job_id"] == "dark_30.000s")) as hdul:
        assert hdul[0].header["NCOMBINE"] == N - 1
        history = "".join(hdul[0].header["HISTORY"])
        assert "rejected by quality control" in history and leak in history


def test_outlier_threshold_is_configurable_and_null_keeps_outliers(faulty, tmp_path):
    folder, _ = faulty
    status = run(folder, tmp_path / "out", what="dark", qc_outlier_sigma=None)
    darks = verdicts(status, "dark_30.000s")
    assert all(f["verdict"] == "ok" for f in darks.values())
    assert all(f["z_level"] is None for f in darks.values())


def test_a_steady_group_has_no_outliers(faulty, tmp_path):
    folder, _ = faulty
    status = run(folder, tmp_path / "out", what="bias")
    frames = verdicts(status, "bias")
    assert all(f["verdict"] == "ok" for f in frames.values())
    assert max(abs(f["z_level"]) for f in frames.values()) < 5


def copy_bias(folder: Path, tmp_path: Path) -> tuple[Path, fits.Header]:
    bias = tmp_path / "bias"
    shutil.copytree(folder / "bias", bias)
    return bias, fits.getheader(sorted(bias.glob("*.fits"))[0])


def test_header_and_data_range_checks_name_their_reason(faulty, tmp_path):
    folder, _ = faulty
    bias, header = copy_bias(folder, tmp_path)
    warm = header.copy()
    warm["CCD-TEMP"] = header["CCD-TEMP"] + 6
    data = fits.getdata(sorted(bias.glob("*.fits"))[1])
    fits.PrimaryHDU(data, header=warm).writeto(bias / "warm.fits")
    nan = np.full(SHAPE, np.nan, np.float32)
    nan[:5] = 500
    fits.PrimaryHDU(nan, header=header).writeto(bias / "nan.fits")
    status = run(folder, tmp_path / "out", what="bias", bias_dir=str(bias))
    frames = verdicts(status, "bias")
    assert frames["warm.fits"]["verdict"].startswith("CCD-TEMP")
    assert "temperature_tolerance 2" in frames["warm.fits"]["verdict"]
    assert frames["nan.fits"]["verdict"].startswith("only 10% of its pixels are finite")
    assert sum(f["verdict"] == "ok" for f in frames.values()) == N


def test_a_bright_flat_above_the_full_scale_limit_is_left_out(faulty, tmp_path):
    folder, _ = faulty
    flats = tmp_path / "flats"
    shutil.copytree(folder / "flats", flats)
    path = sorted(flats.rglob("*.fits"))[0]
    bright = np.clip(fits.getdata(path).astype(np.float64) * 2.0, 0, 65535).astype(np.uint16)
    write_like(path, path.with_name("bright.fits"), data=bright)
    status = run(folder, tmp_path / "out", flats_dir=str(flats))
    frames = verdicts(status, "flat_L_1.000s")
    assert "above qc_flat_max_level 70%" in frames["bright.fits"]["verdict"]
    status = run(folder, tmp_path / "out2", flats_dir=str(flats), qc_flat_max_level=0.9)
    assert verdicts(status, "flat_L_1.000s")["bright.fits"]["verdict"] == "ok" or \
        "outlier" in verdicts(status, "flat_L_1.000s")["bright.fits"]["verdict"]


def test_too_few_usable_frames_say_why_and_other_groups_go_on(faulty, tmp_path):
    folder, _ = faulty
    bias, header = copy_bias(folder, tmp_path)
    for path in sorted(bias.glob("*.fits"))[2:]:
        path.unlink()
    fits.PrimaryHDU(np.zeros(SHAPE, np.uint16), header=header).writeto(bias / "zero.fits")
    status = run(folder, tmp_path / "out", bias_dir=str(bias))
    assert not status.success
    assert "bias: 2 usable frames after quality control (1 left out; first: zero.fits: " \
           "all-zero frame" in status.message
    assert "min_frames is 3" in status.message
    state = {m["job_id"]: m["status"] for m in status.details["masters"]}
    # The flat (1 s, no dark of 1 s) needed that bias; the darks go on.
    assert state == {"bias": "failed", "dark_30.000s": "built", "flat_L_1.000s": "failed"}


def clipped_stats_reference(values, sigma=5.0, iterations=2):
    """`clipped_stats` in numpy, straight from its docstring (moments in float64)."""
    centre = float(np.median(values))
    spread = 1.4826 * float(np.median(np.abs(values - centre)))
    if spread == 0:
        spread = float(values.std())
    for _ in range(iterations):
        kept = values[np.abs(values - centre) <= sigma * spread].astype(np.float64)
        if kept.size == 0:
            return centre, 0.0
        centre, spread = float(kept.mean()), float(kept.std())
        if spread == 0:
            break
    return centre, spread


@settings(max_examples=80, deadline=None)
@given(st.integers(1, 3000), st.integers(0, 2**32 - 1), st.sampled_from([0.0, 0.01, 0.2]),
       st.booleans(), st.sampled_from([np.float32, np.float64]),
       st.sampled_from([1.0, 3.0, 5.0]), st.integers(1, 3))
@example(10, 0, 0.0, True, np.float32, 5.0, 2)
def test_clipped_stats_match_numpy(n, seed, outliers, integer, dtype, sigma, iterations):
    """The compiled passes keep the values numpy's masks keep: the same statistics, on
    noise with hot pixels, integer (camera) values or not."""
    rng = np.random.default_rng(seed)
    values = rng.normal(500, rng.choice([0.3, 3.0, 40.0]), n)
    hit = rng.random(n) < outliers
    values[hit] = rng.choice([0.0, 6e4, 1e3], n)[hit]
    values = (np.rint(values) if integer else values).astype(dtype)
    got = clipped_stats(values, sigma, iterations)
    expected = clipped_stats_reference(values, sigma, iterations)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-9 * 6e4)


@settings(max_examples=60, deadline=None)
@given(arrays(np.float32, st.integers(0, 500), elements=st.integers(-20, 20)),
       st.integers(-5, 5), st.integers(0, 8))
def test_window_moments_keep_the_values_on_the_window_edges(values, centre, halfwidth):
    """Integer values, centre and half-width: many values lie exactly on the edges."""
    from stacker._fast import window_moments

    kept = values[np.abs(values - centre) <= halfwidth].astype(np.float64)
    n, mean, std = window_moments(values, np.float32(centre), np.float32(halfwidth))
    assert n == kept.size
    if n:
        np.testing.assert_allclose([mean, std], [kept.mean(), kept.std()], atol=1e-9)


def test_clipped_stats_are_continuous_on_integer_data_and_ignore_hot_pixels():
    rng = np.random.default_rng(0)
    values = np.rint(rng.normal(500, 3.5, 200_000))
    values[:100] = 60000
    mean, std = clipped_stats(values)
    assert abs(mean - 500) < 0.05
    assert abs(std - np.sqrt(3.5**2 + 1 / 12)) < 0.03


def test_without_quality_control_flats_are_measured_for_their_level_only(faulty, tmp_path):
    """QC off: the flats' medians (which scale them) are those QC on measures, the QC-only
    clipped level and noise are not computed, and the cloudy flat is kept."""
    folder, truth = faulty
    on = verdicts(run(folder, tmp_path / "on", "all"), "flat_L_1.000s")
    status = run(folder, tmp_path / "off", "all", quality_control=False)
    assert status.success
    off = verdicts(status, "flat_L_1.000s")
    assert on.keys() == off.keys()
    for name, stats in off.items():
        assert stats["median"] == on[name]["median"] and stats["std"] == on[name]["std"]
        assert not np.isnan(on[name]["noise"]) and np.isnan(stats["noise"])
        assert stats["verdict"] == "ok"
    assert truth.params["defects"][1] in off


@settings(max_examples=300, deadline=None)
@given(arrays(np.float32, st.integers(1, 1500),  # beyond 512: the ninther pivot
              elements=st.one_of(st.floats(width=32, allow_nan=False, allow_infinity=False),
                                 st.sampled_from([0.0, 1.0, 1.0000001, 25000.5, -3.0]))))
@example(np.array([1.0, 16777217.0, 16777218.0, 3.0], np.float32))  # a + b rounds in float32
@example(np.array([3e38, 3e38], np.float32))  # their float32 sum overflows, as numpy's does
@example(np.array([1e-45, 1e-45, 0.0, 1e-45], np.float32))  # subnormals
def test_frame_median_is_numpys(values):
    """The compiled median of a frame's sample gives np.median's value exactly (for an even
    count, numpy's float32 mean of the two middle values)."""
    with np.errstate(over="ignore"):
        expected = float(np.median(values))
    assert _median(values) == expected or (np.isnan(expected) and np.isnan(_median(values)))
    assert _median(values.astype(np.float64)) == float(np.median(values.astype(np.float64)))


@settings(max_examples=150, deadline=None)
@given(st.integers(1, 3000), st.integers(0, 2**32 - 1),
       st.sampled_from([(0, 65535), (990, 1010), (0, 3), (65530, 65535), (7, 7)]))
def test_counted_medians_are_the_quickselects(n, seed, span):
    """Integer samples: the medians counted in bins equal the quickselects' bit for bit."""
    from stacker._fast import count_values, counted_medians, deviation_median, median_in_place

    values = np.random.default_rng(seed).integers(span[0], span[1] + 1, n).astype(np.float32)
    hist = np.zeros(1 << 16, np.int64)
    assert count_values(values, hist)
    median, mad = counted_medians(hist, n)
    assert median == median_in_place(values.copy())
    assert mad == deviation_median(values, median, np.empty_like(values))


@pytest.mark.parametrize("odd", [1.5, -1.0, 65536.0, np.inf])
def test_values_that_are_not_counts_fall_back_to_the_quickselect(odd, monkeypatch):
    """A non-integer or out-of-range value is refused by the counting (and the frame is
    measured as before); on integer values the counted statistics are the quickselects'."""
    from types import SimpleNamespace

    from stacker import qc
    from stacker._fast import count_values

    values = np.random.default_rng(1).integers(0, 40, (30, 50)).astype(np.float32)
    assert not count_values(np.append(values.ravel(), np.float32(odd)),
                            np.zeros(1 << 16, np.int64))
    frame = SimpleNamespace(path="f.fits", dtype="uint16", kind="dark")
    counted = measure(frame, values)
    monkeypatch.setattr(qc, "COUNTED", {})
    assert measure(frame, values) == counted


@pytest.mark.timeout(60, method="thread")
def test_frame_median_of_repeated_values_finishes():
    """Equal values once made the quickselect quadratic: the 262 144-pixel sample of a
    constant frame took 25 s, and a million equal values would take minutes. Camera data
    are integers, so runs of equal values are the rule, not an edge case."""
    rng = np.random.default_rng(3)
    for values in (np.full(1_000_000, 7.0, np.float32),
                   np.repeat(np.float32([1.0, 2.0]), 500_000),
                   np.round(rng.normal(100, 2, 1_000_000)).astype(np.float32)):
        assert _median(values) == float(np.median(values))


@settings(max_examples=200, deadline=None)
@given(values=arrays(np.float32, st.tuples(st.integers(1, 40), st.integers(1, 60)),
                     elements=st.one_of(st.floats(0, 70000, width=32),
                                        st.sampled_from([np.nan, np.inf, -np.inf, 65535.0,
                                                         500.0, 501.0]))),
       offset=st.sampled_from([None, 0.0, 1000.5]), dtype=st.sampled_from(["uint16", "float32"]),
       kind=st.sampled_from(["dark", "flat"]), integer=st.booleans())
def test_a_frames_sample_statistics_are_numpys(values, offset, dtype, kind, integer):
    """The one compiled pass over a frame's sample against numpy on the same values: count of
    finite values, median (exact), mean and std (float64), extremes, saturation of the raw
    values, and the clipped level and noise of the same subsample."""
    from types import SimpleNamespace

    frame = SimpleNamespace(path="f.fits", dtype=dtype, kind=kind)
    if integer:  # camera values: the medians are counted (when all are in range)
        values = np.round(values).clip(0, 65535)
    raw = values
    work = values if offset is None else values - np.float32(offset)
    st_ = measure(frame, work, None if offset is None else raw, quality=True)
    finite = work[np.isfinite(work)]
    saturated = float(np.mean(raw >= 65535.0)) if dtype == "uint16" else 0.0
    assert st_.saturated_fraction == saturated
    assert st_.finite_fraction == finite.size / work.size
    if finite.size == 0:
        assert np.isnan(st_.median) and np.isnan(st_.mean)
        return
    assert st_.median == float(np.median(finite))
    assert (st_.min, st_.max) == (float(finite.min()), float(finite.max()))
    f64 = finite.astype(np.float64)
    assert st_.mean == pytest.approx(f64.mean(), rel=1e-12, abs=1e-9)
    assert st_.std == pytest.approx(f64.std(), rel=1e-6, abs=1e-6 * (1 + abs(f64.mean())))
    step = 2 if finite.size >= QC_SUBSAMPLE_FROM else 1
    assert (st_.level, st_.noise) == clipped_stats(finite[::step * step], median=st_.median)
    if dtype == "uint16":
        ref = raw[np.isfinite(work)]
        assert st_.full_scale_fraction == float(np.median(ref)) / 65535.0
