"""Master metrics and the bad-pixel mask, judged against the simulator's ground truth."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from helpers import section
from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from stacker import MasterFrameCreator
from stacker.combine import sample_rows
from stacker.frames import read_frame
from stacker.metrics import (
    RESIDUAL_SAMPLE_PIXELS,
    _components,
    _residual_pass,
    _residual_spread,
    find_dust,
    neighbour_median,
)
from stacker.qc import clipped_stats
from stacker.report import _clean
from stacker.simulate import CameraModel, SimulationSpec, simulate

RNG = np.random.default_rng(5)

SHAPE = (64, 96)
CAMERA = CameraModel(shape=SHAPE, hot_pixel_fraction=0.005, n_dust=2, dust_depth=(0.05, 0.08),
                     dark_current_e=0.05, amp_glow_e=1.0)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("metrics")
    spec = SimulationSpec(camera=CAMERA, n_bias=10, dark_exposures=(10.0, 60.0), n_darks=10,
                          n_flats=10, flat_exposure=10.0, seed=4, light_leak_darks=1)
    truth = simulate(folder / "raw", spec)
    cfg = {"master_frames": section(folder / "raw", folder / "out")}
    creator = MasterFrameCreator(cfg)
    status = creator.create_all_master_frames()
    assert status.success, status.message
    return status, truth, creator


def metrics(status, job_id: str) -> dict:
    return next(m for m in status.details["masters"] if m["job_id"] == job_id)["stats"]["metrics"]


def test_bias_read_noise_level_and_patterns_match_the_truth(run):
    status, truth, _ = run
    m = metrics(status, "bias")
    expected = np.sqrt(truth.read_noise_adu ** 2 + 1 / 12)  # quantization adds 1/12 ADU^2
    assert m["read_noise_adu"] == pytest.approx(expected, rel=0.05)
    assert m["read_noise_e"] == pytest.approx(expected * truth.params["gain"], rel=0.05)
    assert m["level_adu"] == pytest.approx(truth.bias.mean(), abs=0.2)
    assert m["row_pattern_adu"] == pytest.approx(truth.bias.mean(axis=1).std(), rel=0.1)
    assert m["column_pattern_adu"] == pytest.approx(truth.bias.mean(axis=0).std(), rel=0.1)
    assert m["frames_used"] == 10 and m["frames_rejected"] == 0
    assert 0 <= m["rejection_fraction_mean"] <= m["rejection_fraction_max"] < 1


def test_dark_current_hot_pixels_and_amp_glow(run):
    status, truth, _ = run
    m = metrics(status, "dark_60.000s")
    assert m["bias_subtracted"] and m["frames_rejected"] == 1  # the light leak
    # The median of a skewed dark signal blurred by the noise of (master dark - master
    # bias) lies above the truth's median: blur the truth the same way, then compare.
    t = 60.0
    noise = np.hypot(truth.noise_floor("dark", t, 9), truth.noise_floor("bias", None, 10))
    blurred = truth.dark_rate * t + np.random.default_rng(0).normal(0, 1, SHAPE) * noise
    expected = np.median(blurred) / t
    assert m["dark_current_adu_s"] == pytest.approx(expected, rel=0.05)
    assert m["dark_current_e_s"] == pytest.approx(expected * truth.params["gain"], rel=0.05)
    # Every hot pixel of the truth is found; a warm one may cross 5 sigma by chance.
    assert truth.params["hot_pixels"] <= m["hot_pixels"] <= truth.params["hot_pixels"] + 2
    glow = m["amp_glow"]
    assert glow["corner"] == "top_right"  # the simulator's glow sits at (nx-1, ny-1)
    assert glow["excess_adu_s"] > 0.3


def test_dark_linearity_across_exposures(run):
    status, truth, _ = run
    (series,) = status.details["dark_series"]
    assert series["exposures"] == [10.0, 60.0]
    assert series["slope_adu_s"] == pytest.approx(np.median(truth.dark_rate), rel=0.15)
    assert abs(series["intercept_adu"]) < 1.0  # bias-subtracted levels start at 0


def test_flat_snr_uniformity_vignetting_and_dust(run):
    status, truth, _ = run
    m = metrics(status, "flat_L_10.000s")
    level = truth.params["flat_level"]
    assert m["snr_frame"] == pytest.approx(np.sqrt(level * truth.params["gain"]), rel=0.1)
    assert m["snr_master"] == pytest.approx(m["snr_frame"] * np.sqrt(10), rel=0.05)
    corners = m["uniformity"]["corner_to_centre"]
    assert all(0.7 < v < 0.9 for v in corners.values())  # 25 % vignetting at the corners
    profile = [p["level"] for p in m["vignetting_profile"]]
    assert profile[0] == 1.0 and profile[-1] < 0.85 and np.all(np.diff(profile) < 0.01)
    dust = m["dust"]
    assert dust["count"] == len(truth.params["dust"])
    for d in truth.params["dust"]:
        nearest = min(dust["shadows"], key=lambda s: np.hypot(s["x"] - d["x"], s["y"] - d["y"]))
        assert np.hypot(nearest["x"] - d["x"], nearest["y"] - d["y"]) < d["radius"] / 2


def test_bad_pixel_mask_holds_the_truths_hot_pixels(run):
    status, truth, _ = run
    (mask_info,) = status.details["bad_pixel_masks"]
    path = Path(mask_info["path"])
    assert path.parent == Path(status.details["output_dir"])
    assert not list(path.parent.glob(".*.part"))
    with fits.open(path) as hdul:
        mask = hdul[0].data
        assert hdul[0].header["NHOT"] == mask_info["hot_pixels"]
    hot_truth = truth.dark_rate * truth.params["gain"] >= truth.params["hot_pixel_rate_e"][0]
    hot = (mask & 1).astype(bool)
    assert np.all(hot[hot_truth]) and np.count_nonzero(hot & ~hot_truth) <= 2
    assert not np.any(mask & 2)  # the simulated flat has no dead pixels


def test_status_get_status_and_report_json_carry_the_same_numbers(run):
    status, _, creator = run
    state = creator.get_status()
    report = json.loads(Path(status.details["reports"]["json"]).read_text())
    for m in report["masters"]:
        assert m["metrics"] == _clean(state["statistics"][m["job_id"]]["metrics"])
    assert state["bad_pixel_masks"] == status.details["bad_pixel_masks"]
    assert report["bad_pixel_masks"] == status.details["bad_pixel_masks"]
    assert state["reports"] == status.details["reports"]


def test_bayer_flat_gives_channel_levels_and_no_false_low_pixels(tmp_path):
    cam = CameraModel(shape=(48, 64), bayer="RGGB", n_dust=0)
    simulate(tmp_path / "raw", SimulationSpec(camera=cam, n_bias=4, dark_exposures=(1.0,),
                                              n_darks=4, n_flats=6, seed=2))
    cfg = {"master_frames": {"bias_dir": str(tmp_path / "raw" / "bias"),
                             "darks_dir": str(tmp_path / "raw" / "darks"),
                             "flats_dir": str(tmp_path / "raw" / "flats"),
                             "output_dir": str(tmp_path / "out")}}
    status = MasterFrameCreator(cfg).create_all_master_frames()
    m = metrics(status, "flat_L_1.000s")
    assert m["bayer_pattern"] == "RGGB"
    ch = m["channel_levels"]
    assert ch["R"] / ch["G1"] == pytest.approx(0.55, rel=0.05)
    assert ch["B"] / ch["G2"] == pytest.approx(0.75, rel=0.05)
    assert m["low_pixels"] == 0


def _stacked_neighbour_median(block: np.ndarray, step: int) -> np.ndarray:
    """The slow reference: np.median over the 8 shifted copies of the edge-padded block."""
    padded = np.pad(block, step, mode="edge")
    h, w = block.shape
    shifts = [padded[step + dy: step + dy + h, step + dx: step + dx + w]
              for dy in (-step, 0, step) for dx in (-step, 0, step) if dy or dx]
    return np.median(np.stack(shifts), axis=0)


@settings(max_examples=200, deadline=None)
@given(st.sampled_from([np.float32, np.float64, np.uint16, np.int32]), st.integers(1, 2),
       st.data())
@example(np.float32, 1, None)
def test_neighbour_median_is_numpys_median_of_the_shifted_copies(dtype, step, data):
    """The compiled network gives np.median's value bit for bit: duplicates, NaN, infinities
    (whose sum is NaN, as numpy's mean of the two middle values), float32 sums that round
    or overflow, integer frames (averaged in float64, as numpy does)."""
    if data is None:  # ranks 3 and 4 sum beyond float32's range
        block = np.array([[3e38, 3e38, 3e38], [3e38, 0, 3e38], [-1, -1, -1]], np.float32)
    else:
        kind = np.dtype(dtype).kind
        elements = (st.one_of(st.floats(width=32 if dtype == np.float32 else 64),
                              st.sampled_from([0.0, 1.0, 16777217.0, -3.5]))
                    if kind == "f" else st.integers(0, 70000 if dtype == np.int32 else 65535))
        shape = data.draw(st.tuples(st.integers(1, 9), st.integers(1, 9)))
        block = data.draw(arrays(dtype, shape, elements=elements))
    with np.errstate(over="ignore", invalid="ignore"):
        expected = _stacked_neighbour_median(block, step)
    got = neighbour_median(block, step)
    assert got.dtype == expected.dtype
    np.testing.assert_array_equal(got, expected)


def test_hot_pixel_search_does_not_depend_on_the_strip_height(tmp_path):
    """The residual's spread is measured on sampled rows, each with the neighbours the whole
    image gives it (edge rows included), and the residuals are the same whatever the strips
    (the memory budget) are, margins included."""
    rng = np.random.default_rng(5)
    # over 2M pixels, so that the sampled rows are a subset (edge rows among them)
    image = rng.normal(100, 3, (1301, 1601)).astype(np.float32)
    image[rng.integers(0, 1301, 4000), rng.integers(0, 1601, 4000)] += 200
    path = tmp_path / "master_dark_60s.fits"
    fits.PrimaryHDU(image).writeto(path)
    frame = read_frame(path, "dark")
    bias = rng.normal(10, 1, image.shape).astype(np.float32)
    fits.PrimaryHDU(bias).writeto(tmp_path / "master_bias.fits")
    bias_frame = read_frame(tmp_path / "master_bias.fits", "bias")
    sampled = sample_rows(*image.shape, RESIDUAL_SAMPLE_PIXELS)
    assert 0 in sampled and image.shape[0] - 1 in sampled and len(sampled) < image.shape[0]
    for step in (1, 2):
        for under, sub in ((None, 0), (bias_frame, bias)):
            full = (image - sub) - neighbour_median(image - sub, step)
            expected = clipped_stats(full[sampled].ravel())[1]
            assert _residual_spread(frame, step, under) == expected
    for step in (1, 2):
        whole = np.concatenate([res for *_, res in _residual_pass(frame, 5000, step)])
        np.testing.assert_array_equal(whole, image - neighbour_median(image, step))
        for rows in (1, 5, 16):
            strips = np.concatenate([res for *_, res in _residual_pass(frame, rows, step)])
            np.testing.assert_array_equal(strips, whole)


def test_neighbour_median_network_orders_every_zero_one_pattern():
    """Every arrangement of 0s and 1s among the 8 neighbours (the 0-1 principle for the
    network's two middle outputs)."""
    for bits in itertools.product((0.0, 1.0), repeat=8):
        block = np.full((3, 3), 7.0, np.float32)
        block[[0, 0, 0, 1, 1, 2, 2, 2], [0, 1, 2, 0, 2, 0, 1, 2]] = bits
        assert neighbour_median(block)[1, 1] == np.median(bits)


def _flood_fill_regions(mask: np.ndarray) -> list[list[tuple[int, int]]]:
    """The slow reference: 8-connected regions by a breadth-first search in Python, in
    raster order of their first cell."""
    seen = np.zeros(mask.shape, bool)
    h, w = mask.shape
    out = []
    for y, x in zip(*np.nonzero(mask), strict=True):
        if seen[y, x]:
            continue
        seen[y, x] = True
        queue, cells = [(int(y), int(x))], []
        while queue:
            cy, cx = queue.pop()
            cells.append((cy, cx))
            for ny_ in range(max(cy - 1, 0), min(cy + 2, h)):
                for nx_ in range(max(cx - 1, 0), min(cx + 2, w)):
                    if mask[ny_, nx_] and not seen[ny_, nx_]:
                        seen[ny_, nx_] = True
                        queue.append((ny_, nx_))
        out.append(sorted(cells))
    return out


@settings(max_examples=200, deadline=None)
@given(arrays(np.bool_, st.tuples(st.integers(1, 12), st.integers(1, 12))))
@example(np.ones((12, 12), bool))
@example(np.eye(6, dtype=bool)[::-1])  # diagonal contact only
def test_dust_regions_are_the_8_connected_components(mask):
    got = [sorted(zip(ys.tolist(), xs.tolist(), strict=True)) for ys, xs in _components(mask)]
    assert got == _flood_fill_regions(mask)


def test_neighbour_median_and_dust_finder_on_synthetic_maps():
    flat = np.ones((40, 60))
    flat[10, 10] = 0.2
    assert neighbour_median(flat)[10, 10] == 1.0
    yy, xx = np.mgrid[0:40, 0:60]
    shadow = 1 - 0.05 * np.exp(-0.5 * (np.hypot(yy - 25, xx - 40) / 3) ** 2)
    vignetted = (1 - 0.2 * ((yy - 20) ** 2 + (xx - 30) ** 2) / 1300) * shadow
    found = find_dust(vignetted, 1, 0.01)
    assert found["count"] == 1
    assert found["shadows"][0]["x"] == pytest.approx(40, abs=1)
    assert found["shadows"][0]["y"] == pytest.approx(25, abs=1)
    assert find_dust(1 - 0.2 * ((yy - 20) ** 2 + (xx - 30) ** 2) / 1300, 1, 0.01)["count"] == 0


def _cosmic_darks(tmp_path, n_darks: int, cosmic_rate: float, **settings):
    """The simulator's truth and the metrics of the master dark (120 s) of `n_darks`
    128x192 darks hit by cosmic rays, with a master bias, built with `settings`."""
    camera = CameraModel(shape=(128, 192), hot_pixel_fraction=0.002, dark_current_e=0.05)
    spec = SimulationSpec(camera=camera, n_bias=8, dark_exposures=(120.0,), n_darks=n_darks,
                          n_flats=0, seed=9, cosmic_rate=cosmic_rate)
    truth = simulate(tmp_path / "raw", spec)
    cfg = {"master_frames": {"bias_dir": str(tmp_path / "raw" / "bias"),
                             "darks_dir": str(tmp_path / "raw" / "darks"),
                             "output_dir": str(tmp_path / "out"), "min_frames": 3, **settings}}
    status = MasterFrameCreator(cfg).create_all_master_frames()
    assert status.success, status.message
    return truth, metrics(status, "dark_120.000s")


def test_with_few_darks_cosmic_rays_are_not_counted_as_hot_pixels(tmp_path, caplog):
    """Four darks cannot reject a cosmic ray, so it lifts the master; it is high in one frame
    only, where a hot pixel is high in all of them."""
    truth, m = _cosmic_darks(tmp_path, 4, 20.0)
    assert m["hot_candidates_not_persistent"] > 20  # the cosmic rays that survived
    assert truth.params["hot_pixels"] <= m["hot_pixels"] <= truth.params["hot_pixels"] + 3
    said = [r.getMessage() for r in caplog.records if "cosmic rays" in r.getMessage()]
    assert said and "4 darks are too few to reject them" in said[0], said


@pytest.mark.parametrize("method", ["mean", "minmax"])
def test_rejections_that_keep_cosmic_rays_do_not_count_them_as_hot_pixels(tmp_path, method,
                                                                          caplog):
    """A mean of many darks rejects nothing and min/max one value a pixel: cosmic rays lift
    the master (by 500-20 000 e / 12 each, above the hot-pixel threshold), but only in one
    or two frames, where a hot pixel is high in all of them."""
    truth, m = _cosmic_darks(tmp_path, 12, 40.0, rejection_method=method)
    assert m["hot_candidates_not_persistent"] > (100 if method == "mean" else 3)
    assert truth.params["hot_pixels"] - 3 <= m["hot_pixels"] <= truth.params["hot_pixels"] + 3
    said = [r.getMessage() for r in caplog.records if "cosmic rays" in r.getMessage()]
    assert said and f"rejection_method {method} keeps them" in said[0], said
    assert "dark_120.000s" in said[0] and "sigma_clip rejects them" in said[0]


@pytest.mark.parametrize("direct", [False, True])
def test_persistent_keeps_the_candidates_high_in_more_than_half_of_the_frames(
        fitsfile, monkeypatch, direct):
    """Candidates high in k of 7 frames (integer and float frames, with a bias): kept when
    2k > 7, read in strips of 2-4 rows on two threads (or, for frames beyond the page
    cache, around it)."""
    from stacker import metrics as m

    monkeypatch.setattr(m, "exceeds_page_cache", lambda nbytes: direct)

    n, ny, nx = 7, 9, 11
    base = RNG.integers(400, 600, size=(ny, nx)).astype(np.float64)
    bias = RNG.integers(100, 120, size=(ny, nx)).astype(np.uint16)
    index = np.array([0, 5, 12, 40, 41, 77, 98])  # rows 0, 0, 1, 3, 3, 7, 8
    k = np.array([0, 1, 3, 4, 5, 7, 4])
    excess = np.full(index.size, 40.0)
    stacks = np.repeat((base + bias)[None], n, axis=0)
    for i, high in zip(index, k, strict=True):
        # high frames: 30 above the level (> half the excess); the others 10 above
        stacks[:, i // nx, i % nx] += np.where(np.arange(n) < high, 30, 10)
    bias_frame = read_frame(fitsfile("bias.fits", bias, IMAGETYP="Bias Frame"))
    for kind in (np.uint16, np.float32):
        frames = [read_frame(fitsfile(f"p{kind.__name__}{i}.fits", stacks[i].astype(kind),
                                      EXPTIME=60.0, IMAGETYP="Dark Frame"))
                  for i in range(n)]
        level = base.ravel()[index]
        monkeypatch.setattr(m, "PERSISTENT_BYTES", n * nx * 8)
        keep = m.persistent(index, level, excess, frames, bias_frame, 10**9, workers=2)
        assert keep.tolist() == (2 * k > n).tolist()
    # no bias: the same frames, the level raised by it
    keep = m.persistent(index, level + bias.ravel()[index], excess, frames, None, 10**9)
    assert keep.tolist() == (2 * k > n).tolist()


def test_persistent_looks_at_evenly_spaced_frames_when_there_are_many(fitsfile,
                                                                        monkeypatch):
    """Beyond PERSISTENT_FRAMES frames (3 here, of 9), the frames looked at are the first,
    the middle and the last: a pixel high in two of those is kept, one high in five other
    frames is not."""
    from stacker import metrics as m

    monkeypatch.setattr(m, "PERSISTENT_FRAMES", 3)
    stacks = np.full((9, 4, 5), 500, np.uint16)
    stacks[[0, 4], 1, 2] += 30  # index 7
    stacks[[1, 2, 3, 5, 6], 3, 3] += 30  # index 18
    frames = [read_frame(fitsfile(f"e{i}.fits", stacks[i], EXPTIME=60.0,
                                  IMAGETYP="Dark Frame")) for i in range(9)]
    keep = m.persistent(np.array([7, 18]), np.array([500.0, 500.0]), np.array([40.0, 40.0]),
                        frames, None, 10**9)
    assert keep.tolist() == [True, False]


def test_bad_pixel_mask_file_is_byte_for_byte_what_astropy_wrote(tmp_path):
    """The mask is written by stacker's own header writer; the reference is the astropy
    code it replaced. A rerun with the same mask finds the file (read without astropy)."""
    from stacker import __version__, metrics

    shape = (7, 5)
    sources = ["/masters/" + "d" * 90 + ".fits", "master_flat_L.fits"]  # a HISTORY > 72
    bad = metrics._Bad()
    bad.add("hot", shape, np.array([0, 3, 34]), sources[0])
    bad.add("low", shape, np.array([3, 10]), sources[1])
    info = metrics.write_mask(tmp_path, "20261205_000000", shape, bad)

    mask = np.zeros(35, np.uint8)
    mask[[0, 3, 34]] |= metrics.HOT_BIT
    mask[[3, 10]] |= metrics.LOW_BIT
    header = fits.Header()
    header["IMAGETYP"] = ("BAD PIXEL MASK", "type of image")
    header["MASKHOT"] = (metrics.HOT_BIT, "bit of hot pixels (master darks)")
    header["MASKLOW"] = (metrics.LOW_BIT, "bit of dead or low pixels (master flats)")
    header["NHOT"] = (3, "hot pixels")
    header["NLOW"] = (2, "dead or low pixels")
    header["CREATOR"] = f"stacker {__version__}"
    header[metrics.MASK_CARD] = (metrics._mask_digest(mask, sources), "digest, for reruns")
    for source in sources:
        header.add_history(f"from master {source}")
    reference = tmp_path / "reference.fits"
    fits.PrimaryHDU(mask.reshape(shape), header=header).writeto(reference)
    path = Path(info["path"])
    assert path.name == "bad_pixel_mask_20261205_000000.fits"
    assert path.read_bytes() == reference.read_bytes()
    assert (info["hot_pixels"], info["low_pixels"]) == (3, 2)

    again = metrics.write_mask(tmp_path, "20261206_000000", shape, bad)
    assert again["path"] == str(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name, "reference.fits"]


@given(st.lists(st.lists(st.integers(0, 40), max_size=30), max_size=4))
def test_flagged_indices_are_the_distinct_ones_sorted(lists):
    """The mask's flagged pixels: what np.unique gives (it is replaced for its speed)."""
    from stacker import metrics

    indices = [np.array(v, np.int64) for v in lists]
    got = metrics._flagged(indices)
    want = np.unique(np.concatenate(indices)) if indices else np.zeros(0)
    assert got.dtype == np.intp
    assert got.tolist() == want.tolist()


def test_cosmic_ray_warning_only_beyond_its_fraction(caplog):
    from stacker import metrics as m
    from stacker.config import Settings

    settings = Settings(rejection_method="sigma_clip")
    limit = int(m.COSMIC_WARNING_FRACTION * 1000 * 1000)
    m._warn_cosmic_rays("dark_1s", limit, (1000, 1000), 4, settings)
    assert not [r for r in caplog.records if "cosmic rays" in r.getMessage()]
    m._warn_cosmic_rays("dark_1s", limit + 1, (1000, 1000), 4, settings)
    said = [r.getMessage() for r in caplog.records if "cosmic rays" in r.getMessage()]
    assert said == [f"dark_1s: {limit + 1} pixels (0.0101 %) of the master are raised by "
                    "cosmic rays (4 darks are too few to reject them; not counted as hot "
                    "pixels): use more darks"]
