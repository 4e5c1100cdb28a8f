"""report.json, report.html and the `report` / `inspect` commands, on a real run."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
import zlib
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from helpers import run_stacker, section
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from stacker import MasterFrameCreator
from stacker.report import SCHEMA_VERSION, png
from stacker.simulate import CameraModel, SimulationSpec, simulate


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("report")
    spec = SimulationSpec(camera=CameraModel(shape=(40, 64)), n_bias=6, dark_exposures=(1.0,),
                          n_darks=6, n_flats=6, seed=8, light_leak_darks=1)
    truth = simulate(folder / "raw", spec)
    cfg = {"master_frames": section(folder / "raw", folder / "out")}
    status = MasterFrameCreator(cfg).create_all_master_frames()
    assert status.success, status.message
    return folder / "out", status, truth


class _Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.sections: list[str] = []
        self.images: list[str] = []
        self.rejected_rows = 0
        self.svgs = 0

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "section" and "master" in (a.get("class") or ""):
            self.sections.append(a["id"])
        if tag == "img":
            self.images.append(a["src"])
        if tag == "tr" and a.get("class") == "rejected":
            self.rejected_rows += 1
        if tag == "svg":
            self.svgs += 1


def decode_png(uri: str) -> tuple[int, int]:
    assert uri.startswith("data:image/png;base64,")
    data = base64.b64decode(uri.split(",", 1)[1])
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    # Every chunk's CRC is right and the pixel data inflates to height rows.
    pos, idat = 8, b""
    while pos < len(data):
        n = int.from_bytes(data[pos:pos + 4], "big")
        tag, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + n]
        assert int.from_bytes(data[pos + 8 + n:pos + 12 + n], "big") == zlib.crc32(tag + body)
        idat += body if tag == b"IDAT" else b""
        pos += 12 + n
    assert len(zlib.decompress(idat)) % height == 0
    return width, height


def test_report_json_has_the_documented_schema(run):
    out, status, truth = run
    report = json.loads((out / "report.json").read_text())
    assert report["schema_version"] == SCHEMA_VERSION
    for key in ("creator", "created", "timestamp", "settings", "inventory", "plan", "masters",
                "dark_series", "bad_pixel_masks", "errors", "success", "message"):
        assert key in report, key
    assert [j["id"] for j in report["plan"]["jobs"]] == ["bias", "dark_1.000s", "flat_L_1.000s"]
    dark = next(m for m in report["masters"] if m["job_id"] == "dark_1.000s")
    assert Path(dark["path"]).exists() and dark["metrics"]["hot_pixels"] >= 0
    leak = truth.params["defects"][0]
    verdicts = {Path(f["path"]).name: f["verdict"] for f in dark["frames"]}
    assert verdicts[leak].startswith("outlier: level")
    assert status.details["reports"]["json"] == str(out / "report.json")
    assert not list(out.glob(".*.part"))


def test_report_html_has_every_master_images_and_rejected_frames(run):
    out, status, _ = run
    page = _Page()
    page.feed((out / "report.html").read_text())
    assert page.sections == [m["job_id"] for m in status.details["masters"]]
    assert len(page.images) == 2 * len(page.sections)  # preview and rejection map each
    for uri in page.images:
        assert decode_png(uri) == (64, 40)
    assert page.svgs == 3 * len(page.sections)  # histogram, row and column profiles
    assert page.rejected_rows == 1  # the light-leak dark


def test_stacker_report_regenerates_the_page(run, tmp_path):
    out, _, _ = run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    (copy / "report.html").unlink()
    result = run_stacker("report", str(copy))
    assert result.returncode == 0, result.stderr
    assert (copy / "report.html").read_text().count('class="master"') == 3
    missing = run_stacker("report", str(tmp_path / "nothing"))
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1
    assert "report.json not found" in missing.stderr and "Traceback" not in missing.stderr


def test_stacker_inspect_prints_headers_and_statistics(run, tmp_path):
    _, status, _ = run
    master = status.details["masters"][0]["path"]
    bad = tmp_path / "bad.fits"
    bad.write_text("not fits")
    result = run_stacker("inspect", master, str(bad))
    assert result.returncode == 2
    assert "IMAGETYP  MASTER BIAS" in result.stdout and "NCOMBINE=6" in result.stdout
    assert "stats     mean" in result.stdout
    assert result.stderr.startswith(f"stacker: error: {bad}: not a readable FITS image")
    assert "Traceback" not in result.stderr


def test_png_encoder_round_trips_through_a_known_decoder():
    image = (np.arange(12 * 7).reshape(7, 12) % 256).astype(np.uint8)
    data = png(image)
    raw = zlib.decompress(data[data.index(b"IDAT") + 4:])
    rows = np.frombuffer(raw, np.uint8).reshape(7, 13)
    assert np.all(rows[:, 0] == 0) and np.array_equal(rows[:, 1:], image)


@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs chromium (Debian package)")
def test_report_renders_in_a_headless_browser(run, tmp_path):
    out, _, _ = run
    shot = tmp_path / "report.png"
    subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu",
                    f"--screenshot={shot}", "--window-size=1200,2400",
                    (out / "report.html").as_uri()], capture_output=True, timeout=120)
    assert shot.exists() and shot.stat().st_size > 20_000  # a page with pictures, not blank


def _nanmean(values: np.ndarray, axis) -> np.ndarray:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # "Mean of empty slice": NaN wanted
        return np.nanmean(values, axis=axis)


def reference_means(data: np.ndarray, factor: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The plain definitions: nanmean of NaN-padded blocks, of every row and every column."""
    h, w = data.shape
    ph, pw = -(-h // factor) * factor, -(-w // factor) * factor
    padded = np.full((ph, pw), np.nan)
    padded[:h, :w] = data
    blocks = _nanmean(padded.reshape(ph // factor, factor, pw // factor, factor), (1, 3))
    return blocks, _nanmean(data.astype(np.float64), 1), _nanmean(data.astype(np.float64), 0)


images = arrays(np.float32, st.tuples(st.integers(1, 40), st.integers(1, 40)),
                elements=st.floats(-1e4, 1e4, width=32) | st.sampled_from([np.nan, np.inf]))


@settings(max_examples=150, deadline=None)
@given(images, st.integers(1, 9), st.lists(st.integers(1, 40), min_size=1, max_size=12))
def test_profile_sums_match_nanmean_whatever_the_strips(data, factor, heights):
    """Blocks (ragged edges, all-NaN ones), rows and columns from strips of any height,
    cut anywhere relative to the block rows, with and without missing pixels (which take
    another path in the kernel), equal the plain nanmean definitions."""
    from stacker.images import ProfileSums

    sums = ProfileSums(data.shape, factor)
    y = 0
    for h in heights * (data.shape[0] // sum(heights) + 1):
        if y == data.shape[0]:
            break
        sums.add(data[y: y + h])
        y = min(y + h, data.shape[0])
    clean = np.where(np.isinf(data), np.nan, data)  # inf is as missing as NaN
    for got, want in zip(sums.means(), reference_means(clean, factor), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-6)


def test_profile_sums_edge_cases():
    """An all-NaN block and row are NaN, not 0; inf counts as missing; order is enforced."""
    from stacker.images import ProfileSums

    data = np.arange(35, dtype=np.float32).reshape(5, 7)
    data[:3, :3] = np.nan  # block (0, 0) of 3x3 blocks
    data[4, :] = np.nan
    data[3, 6] = np.inf
    sums = ProfileSums(data.shape, 3)
    sums.add(data[:2])
    with pytest.raises(ValueError, match="only 2 of 5 rows"):
        sums.means()
    with pytest.raises(ValueError, match="does not continue"):
        sums.add(data[:, :3])
    sums.add(data[2:])
    with pytest.raises(ValueError, match="does not continue"):
        sums.add(data[:1])
    blocks, rows, cols = sums.means()
    clean = np.where(np.isinf(data), np.nan, data)
    for got, want in zip((blocks, rows, cols), reference_means(clean, 3), strict=True):
        np.testing.assert_array_equal(got, want)
    assert np.isnan(blocks[0, 0]) and np.isnan(rows[4]) and blocks[1, 1] == 25.0
    assert np.isnan(blocks[1, 2])  # one inf and one NaN: nothing to average
    with pytest.raises(ValueError, match="factor"):
        ProfileSums((4, 4), 0)


def _master_file(path: Path, data: np.ndarray, used: np.ndarray) -> Path:
    from astropy.io import fits

    fits.HDUList([fits.PrimaryHDU(data), fits.ImageHDU(used, name="NUSED")]).writeto(path)
    return path


@pytest.fixture(scope="module")
def odd_master(tmp_path_factory):
    """A 1300x700 float32 master with NaNs (one whole 3x3 preview block) and its int16
    frames-used map: strips of 187 rows, preview blocks of 3, so strips cut blocks."""
    rng = np.random.default_rng(3)
    data = rng.normal(1000, 20, (1300, 700)).astype(np.float32)
    data[rng.random(data.shape) < 0.01] = np.nan
    data[:3, :3] = np.nan
    data[500] = np.nan
    used = rng.integers(15, 21, data.shape).astype(np.int16)
    path = _master_file(tmp_path_factory.mktemp("odd") / "master.fits", data, used)
    return path, data, used


def test_profile_means_of_a_file_read_in_unaligned_strips(odd_master):
    from stacker.images import block_mean, image_frame, profile_means, read_rows
    from stacker.metrics import _row_col_means

    path, data, used = odd_master
    frame = image_frame(path, 0)
    sample = [0, 5, 186, 187, 188, 1299]
    for rows in (1, 7, 256):
        blocks, row_means, col_means, sampled = profile_means(frame, 3, rows, sample)
        for got, want in zip((blocks, row_means, col_means), reference_means(data, 3),
                             strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-12)
        np.testing.assert_array_equal(sampled, read_rows(frame, sample))
    np.testing.assert_allclose(block_mean(image_frame(path, "NUSED"), 4, 100),
                               reference_means(used.astype(np.float32), 4)[0], rtol=1e-12)
    for got, want in zip(_row_col_means(frame, 50), reference_means(data, 1)[1:], strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-12)


def test_block_means_of_two_halves_read_on_two_threads(odd_master):
    """A span is measured as an image of its own; block_mean with a pool reads the lower
    half on the pool's thread and gives the blocks of the whole, ragged last row included."""
    from concurrent.futures import ThreadPoolExecutor

    from stacker.images import block_mean, image_frame, profile_means

    path, data, _ = odd_master
    frame = image_frame(path, 0)
    blocks, row_means, col_means, sampled = profile_means(frame, 4, 100, [3, 650, 1299],
                                                          span=(648, 1300))
    for got, want in zip((blocks, row_means, col_means), reference_means(data[648:], 4),
                         strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-12)
    np.testing.assert_array_equal(sampled, data[[650, 1299]])
    with ThreadPoolExecutor(1) as pool:
        for factor in (3, 7, 700, 1300):  # 700: a single row of blocks, nothing to split
            np.testing.assert_allclose(block_mean(frame, factor, 64, pool),
                                       reference_means(data, factor)[0], rtol=1e-12)


def test_master_pictures_equal_the_plain_definitions(odd_master):
    """Every picture is what the plain nanmean blocks, profiles and rows would draw."""
    from stacker.combine import sample_rows
    from stacker.report import (
        data_uri,
        heat_image,
        master_pictures,
        svg_histogram,
        svg_profile,
        zscale_image,
    )

    path, data, used = odd_master
    pics = master_pictures(str(path), "any", 20)
    blocks, row_means, col_means = reference_means(data, 3)
    assert pics["block"] == "3"
    assert pics["preview"] == data_uri(png(zscale_image(blocks)[::-1]))
    assert pics["histogram"] == svg_histogram(data[sample_rows(*data.shape)].ravel())
    assert pics["rows"] == svg_profile(row_means, "row means (y)")
    assert pics["columns"] == svg_profile(col_means, "column means (x)")
    rejected = 1 - reference_means(used.astype(np.float32), 3)[0] / 20
    top = float(np.nanmax(rejected))
    assert pics["rejection"] == data_uri(png(heat_image(rejected, top)[::-1]))
    assert pics["rejection_top"] == f"{top:.1%}"


@settings(max_examples=150, deadline=None)
@given(arrays(np.float32, st.integers(1, 300),
              elements=st.floats(-50, 50, width=32) | st.sampled_from([0.0, 10.0])),
       st.floats(-60, 10), st.floats(0.001, 100), st.booleans())
def test_histogram_counts_as_numpy_does(values, lo, span, numpy_limits):
    """svg_histogram's compiled counting equals np.histogram: edges, dtype, values on edges."""
    from stacker.report import histogram

    hi = lo + span
    if numpy_limits:  # np.percentile's float64 scalars make float64 edges, Python floats not
        lo, hi = np.float64(lo), np.float64(hi)
    counts, edges = histogram(values, 80, lo, hi)
    want, want_edges = np.histogram(values, bins=80, range=(lo, hi))
    assert edges.dtype == want_edges.dtype
    np.testing.assert_array_equal(edges, want_edges)
    np.testing.assert_array_equal(counts, want)


def test_profile_text_is_the_numpy_scalars_formatting():
    from stacker.report import svg_profile

    values = np.random.default_rng(5).normal(0, 1e3, 500)
    values[7] = np.nan
    svg = svg_profile(values, "t")
    ok = np.isfinite(values)
    lo, hi = values[ok].min(), values[ok].max()
    xs = 35 + np.arange(500) / 499 * 375
    ys = 140 - 20 - (np.where(ok, values, lo) - lo) / (hi - lo) * 105
    assert " ".join(f"{x:.1f},{y:.1f}" for x, y in zip(xs, ys, strict=True)) in svg


@settings(max_examples=100, deadline=None)
@given(arrays(np.float64, st.tuples(st.integers(1, 20), st.integers(1, 20)),
              elements=st.floats(-0.5, 1.5) | st.sampled_from([0.0, 1 / 3, 2 / 3, 1.0, np.nan,
                                                                np.inf, -np.inf])),
       st.sampled_from([0.0, -1.0, 1e-300, 0.05, 1 / 3, 1.0, 7.0]) | st.floats(1e-6, 10))
def test_heat_image_is_the_numpy_expression(fraction, top):
    """The compiled rejection-map colours equal the plain numpy expression, bit for bit."""
    from stacker.report import heat_image

    with np.errstate(invalid="ignore", over="ignore"):
        v = np.clip(np.nan_to_num(fraction / top if top > 0 else fraction * 0), 0, 1)
        rgb = np.stack([np.clip(3 * v, 0, 1), np.clip(3 * v - 1, 0, 1),
                        np.clip(3 * v - 2, 0, 1)], axis=-1)
    np.testing.assert_array_equal(heat_image(fraction, top), (rgb * 255).astype(np.uint8))


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 5000),
    seed=st.integers(0, 2**32 - 1),
    kind=st.sampled_from(["normal", "integers", "constant", "outliers"]),
)
def test_zscale_limits_are_astropys(n, seed, kind):
    """Our port gives astropy's ZScaleInterval limits for sky-like, quantized, flat and
    outlier-ridden samples (it replaces a ~0.1 s import in every run)."""
    from astropy.visualization import ZScaleInterval

    from stacker.report import zscale_limits

    rng = np.random.default_rng(seed)
    if kind == "normal":
        values = rng.normal(1000, 30, n)
    elif kind == "integers":
        values = rng.integers(0, 20, n).astype(np.float32)
    elif kind == "constant":
        values = np.full(n, 7.5)
    else:
        values = rng.normal(0, 1, n)
        values[rng.random(n) < 0.1] = 1e4
    expected = ZScaleInterval().get_limits(values)
    assert zscale_limits(values) == pytest.approx(expected, rel=1e-12, abs=1e-12)


def test_a_run_draws_its_pictures_while_a_master_is_flushed_not_after(tmp_path, monkeypatch):
    """Each master's pictures are drawn from its unfinished file while it is flushed to
    disk (the CPU would be idle), and the report does not read the masters again; the
    page shows what `stacker report`, reading the finished masters, draws."""
    from stacker import report

    calls = []
    draw = report.master_pictures

    def spy(path, job_id, n_used):
        calls.append(Path(path))
        return draw(path, job_id, n_used)

    monkeypatch.setattr(report, "master_pictures", spy)
    spec = SimulationSpec(camera=CameraModel(shape=(30, 50)), n_bias=4, dark_exposures=(1.0,),
                          n_darks=4, n_flats=4, seed=2)
    simulate(tmp_path / "raw", spec)
    status = MasterFrameCreator({"master_frames": section(tmp_path / "raw", tmp_path / "out")}
                                ).create_all_master_frames()
    assert status.success, status.message
    finals = {Path(m["path"]) for m in status.details["masters"]}
    assert len(calls) == 3 and not finals & set(calls)
    assert not any(p.exists() for p in calls)  # unfinished files, renamed since
    monkeypatch.setattr(report, "master_pictures", draw)
    copy = tmp_path / "copy"
    shutil.copytree(tmp_path / "out", copy)
    assert run_stacker("report", str(copy)).returncode == 0
    pages = [(d / "report.html").read_text() for d in (tmp_path / "out", copy)]
    assert "pictures unavailable" not in pages[0] and pages[0].count("data:image/png") == 6
    built, read = (re.findall(r'src="(data:[^"]+)"|(<svg.*?</svg>)', p, re.S) for p in pages)
    assert built == read and len(built) == 15
