"""The simulator writes what a capture program writes, and its truth is the truth."""

from __future__ import annotations

import numpy as np
import pytest
from astropy.io import fits

from stacker.simulate import CameraModel, SimulationSpec, Truth, simulate

SMALL = CameraModel(shape=(32, 48))


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sim")
    spec = SimulationSpec(camera=SMALL, n_bias=40, dark_exposures=(10.0, 100.0), n_darks=30,
                          n_flats=30, seed=7, cosmic_rate=0.0)
    return folder, simulate(folder, spec)


def load(paths) -> np.ndarray:
    return np.stack([fits.getdata(p).astype(np.float64) for p in sorted(paths)])


def test_frames_are_uint16_with_bzero_and_real_headers(sim):
    folder, _ = sim
    path = sorted((folder / "darks" / "10s").glob("*.fits"))[0]
    with fits.open(path, do_not_scale_image_data=True) as hdul:
        h = hdul[0].header
        assert (h["BITPIX"], h["BZERO"], h["BSCALE"]) == (16, 32768, 1)
        assert (h["IMAGETYP"], h["EXPTIME"], h["EXPOSURE"]) == ("Dark Frame", 10.0, 10.0)
        for key in ("CCD-TEMP", "SET-TEMP", "GAIN", "OFFSET", "XBINNING", "YBINNING",
                    "INSTRUME", "DATE-OBS", "BUNIT"):
            assert key in h
        assert abs(h["CCD-TEMP"] - SMALL.temperature) <= 0.2
    flat = fits.getheader(sorted((folder / "flats" / "L").glob("*.fits"))[0])
    assert flat["IMAGETYP"] == "Flat Field" and flat["FILTER"] == "L"
    assert len(list((folder / "bias").glob("*.fits"))) == 40


def test_mean_of_bias_frames_converges_to_the_truth(sim):
    folder, truth = sim
    mean = load((folder / "bias").glob("*.fits")).mean(axis=0)
    floor = truth.noise_floor("bias", 0.0, 40)
    err = mean - truth.master_bias()
    assert np.sqrt(np.mean(err ** 2)) < 1.15 * floor.mean()
    assert abs(err.mean()) < 5 * floor.mean() / np.sqrt(err.size)
    # the fixed pattern is really there: rows and columns differ by more than the noise
    assert truth.bias.std() > 2


def test_dark_signal_grows_linearly_at_the_configured_rate(sim):
    folder, truth = sim
    medians = []
    for t in (10, 100):
        stack = load((folder / "darks" / f"{t}s").glob("*.fits")).mean(axis=0)
        err = stack - truth.master_dark(t)
        assert np.sqrt(np.mean(err ** 2)) < 1.15 * np.sqrt(np.mean(
            truth.noise_floor("dark", t, 30) ** 2))
        medians.append(np.median(stack - truth.master_bias()))
    rate = (medians[1] - medians[0]) / 90
    assert rate == pytest.approx(np.median(truth.dark_rate), rel=0.25)


def test_hot_pixels_and_amp_glow_are_in_the_truth(sim):
    _, truth = sim
    ny, nx = truth.dark_rate.shape
    assert truth.dark_rate[-1, -1] > 5 * truth.dark_rate[ny // 2, nx // 2]  # amp glow corner
    big = simulate_truth(CameraModel(shape=(200, 300), hot_pixel_fraction=1e-3))
    assert (big.dark_rate > 1.0).sum() >= 30  # ~60 hot pixels at 2-20 e-/s


def simulate_truth(camera, **kw):
    import tempfile

    return simulate(tempfile.mkdtemp(), SimulationSpec(camera=camera, n_bias=0, n_darks=0,
                                                       n_flats=0, **kw))


def test_cosmic_rays_hit_long_darks(tmp_path):
    truth = simulate(tmp_path, SimulationSpec(camera=SMALL, n_bias=0, dark_exposures=(60.0,),
                                              n_darks=5, n_flats=0, cosmic_rate=200.0))
    frames = load((tmp_path / "darks" / "60s").glob("*.fits"))
    excess = frames - truth.master_dark(60.0)
    assert (excess > 300).sum() >= 10


def test_flats_carry_the_flat_pattern_with_drift(sim):
    folder, truth = sim
    frames = load((folder / "flats" / "L").glob("*.fits")) - truth.master_dark(1.0)
    levels = np.median(frames, axis=(1, 2))
    assert 1.02 < levels.max() / levels.min() < 1.04  # 3 % twilight drift
    normalized = (frames / levels[:, None, None]).mean(axis=0)
    normalized /= normalized.mean()
    err = normalized - truth.master_flat("mean")
    assert np.sqrt(np.mean(err ** 2)) < 1.3 * np.sqrt(np.mean(
        truth.noise_floor("flat", 1.0, 30) ** 2))
    assert truth.flat.min() < 0.9  # vignetting and dust are visible
    assert truth.master_flat("max").max() == 1.0
    assert np.median(truth.master_flat("median")) == pytest.approx(1.0)


def test_same_seed_same_files_other_seed_other_files(tmp_path):
    spec = SimulationSpec(camera=CameraModel(shape=(8, 8)), n_bias=2, dark_exposures=(1.0,),
                          n_darks=1, n_flats=1, seed=1)
    simulate(tmp_path / "a", spec)
    simulate(tmp_path / "b", spec)
    simulate(tmp_path / "c", SimulationSpec(**{**spec.__dict__, "seed": 2}))
    a = fits.getdata(tmp_path / "a" / "bias" / "bias_0001.fits")
    assert (a == fits.getdata(tmp_path / "b" / "bias" / "bias_0001.fits")).all()
    assert (a != fits.getdata(tmp_path / "c" / "bias" / "bias_0001.fits")).any()


def test_flat_layout_puts_every_kind_in_one_folder_with_imagetyp(tmp_path):
    simulate(tmp_path, SimulationSpec(camera=CameraModel(shape=(8, 8)), n_bias=2,
                                      dark_exposures=(1.0,), n_darks=2, n_flats=2,
                                      layout="flat"))
    kinds = sorted(fits.getheader(p)["IMAGETYP"] for p in (tmp_path / "frames").glob("*.fits"))
    assert kinds == ["Bias Frame"] * 2 + ["Dark Frame"] * 2 + ["Flat Field"] * 2


def test_truth_round_trips(sim):
    folder, truth = sim
    again = Truth.load(folder)
    np.testing.assert_array_equal(again.flat, truth.flat)
    np.testing.assert_array_equal(again.master_dark(5.0), truth.master_dark(5.0))
    assert again.params == truth.params


def test_bad_specs_are_refused():
    with pytest.raises(ValueError, match="layout"):
        SimulationSpec(layout="tree")
    with pytest.raises(ValueError, match="n_darks"):
        SimulationSpec(n_darks=-1)
