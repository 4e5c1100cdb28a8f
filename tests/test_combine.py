"""The Dask layer: one fused task per strip, and exact statistics of a written master."""

from __future__ import annotations

from dataclasses import astuple

import dask
import dask.array as da
import numpy as np
import pytest
from astropy.io import fits
from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from stacker import _fast
from stacker.combine import (
    Prepare,
    combine_into,
    frame_stack,
    key_values,
    master_statistics,
    normalize_in_place,
    reduce_stack,
    sample_rows,
)
from stacker.frames import read_frame
from stacker.io import MasterWriter, StripReader, plan_strips
from stacker.kernels import Mean, MinMax, SigmaClip


def _mean(block):
    return np.nanmean(block, axis=0), np.isfinite(block).sum(axis=0)


def _reader(tmp_path, n=4, shape=(30, 7)):
    rng = np.random.default_rng(0)
    frames = []
    for i in range(n):
        path = tmp_path / f"f{i}.fits"
        fits.PrimaryHDU(rng.integers(0, 65535, shape).astype(np.uint16)).writeto(path)
        frames.append(read_frame(path, kind="bias"))
    return StripReader(tuple(frames))


class _Sink:
    def __init__(self, shape):
        self.out = np.zeros(shape, np.float32)

    def __setitem__(self, region, value):
        self.out[region] = value


def test_one_fused_task_per_strip_and_no_rechunk(tmp_path):
    reader = _reader(tmp_path)
    strips = plan_strips(30, 4)
    reduced = reduce_stack(frame_stack(reader, strips), _mean)
    layers = reduced.__dask_graph__().layers
    assert not any("rechunk" in name for name in layers)
    stored = da.store(reduced, _Sink((2, 30, 7)), lock=False, compute=False)
    (optimized,) = dask.optimize(stored)
    assert len(dict(optimized.__dask_graph__())) == len(strips)


def test_the_reduced_stack_is_the_kernel_of_the_whole_stack(tmp_path):
    reader = _reader(tmp_path)
    sink = _Sink((2, 30, 7))
    da.store(reduce_stack(frame_stack(reader, plan_strips(30, 7)), _mean), sink, lock=False,
             scheduler="threads")
    whole = reader.read(0, 30)
    np.testing.assert_allclose(sink.out[0], whole.mean(axis=0), rtol=1e-6)
    assert (sink.out[1] == 4).all()


def test_prepare_subtracts_then_scales(tmp_path):
    reader = _reader(tmp_path, n=3)
    master = reader.frames[0]
    prepare = Prepare(calibration=StripReader((master,)), scales=(1.0, 2.0, 0.5))
    block = reader.read(3, 9)
    expected = (block - reader.read(3, 9)[0]) * np.array([1.0, 2.0, 0.5])[:, None, None]
    np.testing.assert_allclose(prepare(block.copy(), 3, 9), expected, rtol=1e-6)
    # applied frame by frame as they are read: the very same values
    fused = prepare.read(reader, 3, 9, np.full((3, 6, 7), np.nan, np.float32))
    np.testing.assert_array_equal(fused, prepare(block.copy(), 3, 9))
    for scales in (None, (3.0, 1.0, 0.25)):
        only = Prepare(scales=scales)
        np.testing.assert_array_equal(only.read(reader, 3, 9, np.empty((3, 6, 7), np.float32)),
                                      only(reader.read(3, 9), 3, 9))


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), use_master=st.booleans(),
       scales=st.none() | st.lists(st.floats(1e-3, 1e3), min_size=3, max_size=3),
       span=st.tuples(st.integers(0, 29), st.integers(1, 30)),
       staging=st.sampled_from([14, 56, 4096]))
def test_calibrated_reading_equals_numpy_bit_for_bit(tmp_path_factory, seed, use_master,
                                                     scales, span, staging):
    """Camera frames minus a float32 master, times any scale, converted in one compiled pass
    piece by piece (tiny staging pieces included) = numpy's subtract-then-multiply."""
    from stacker import io

    tmp = tmp_path_factory.mktemp("cal")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(io, "STAGING_BYTES", staging)
        _check_calibrated_reading(tmp, seed, use_master, scales, span)


def _check_calibrated_reading(tmp, seed, use_master, scales, span):
    reader = _reader(tmp, n=3)
    rng = np.random.default_rng(seed)
    fits.PrimaryHDU(rng.uniform(-50, 70000, (30, 7)).astype(np.float32)).writeto(tmp / "m.fits")
    master = StripReader((read_frame(tmp / "m.fits", kind="bias"),)) if use_master else None
    prepare = Prepare(calibration=master, scales=None if scales is None else tuple(scales))
    y0, y1 = min(span), max(min(span) + 1, max(span))
    fused = prepare.read(reader, y0, y1, np.full((3, y1 - y0, 7), np.nan, np.float32))
    np.testing.assert_array_equal(fused, prepare(reader.read(y0, y1), y0, y1))


def test_sample_rows_are_spread_and_bounded():
    assert sample_rows(10, 100) == list(range(10))
    rows = sample_rows(6388, 9576)
    assert rows[0] == 0 and rows[-1] == 6387 and 100 <= len(rows) <= 106
    assert len(rows) * 9576 >= 1_000_000


def _written(tmp_path, image):
    h = fits.Header()
    for key in ("DATAMEAN",):
        h[key] = 0.0
    c = fits.Header()
    w = MasterWriter.create(tmp_path / "m.fits", image.shape, h, c)
    w.write(0, image, np.full(image.shape, 3))
    return w


@settings(max_examples=60, deadline=None)
@given(arrays(np.float32, st.tuples(st.integers(1, 12), st.integers(1, 9)),
              elements=st.one_of(st.floats(-1e6, 1e6, width=32), st.just(np.nan),
                                 st.sampled_from([0.0, 1.0, 1.0000001]))))
@example(np.array([[np.nan, np.nan]], np.float32))
@example(np.full((3, 3), 7.0, np.float32))
@example(np.array([[-0.0, 0.0, -1e-45, 1e-45, -3.0, 2.5]], np.float32))  # signs, subnormals
@example(np.array([[1.0, np.inf, -np.inf, 2.0]], np.float32))  # inf is not a value
def test_master_statistics_are_exact(tmp_path_factory, image):
    w = _written(tmp_path_factory.mktemp("stats"), image)
    stats = master_statistics(w, rows=2)
    # the median's pass over the file, strips shared among threads, finds the same values
    np.testing.assert_equal(astuple(master_statistics(w, rows=1, workers=3)), astuple(stats))
    finite = image[np.isfinite(image)].astype(np.float64)
    assert stats.n_nan == image.size - finite.size
    if finite.size == 0:
        assert np.isnan(stats.median)
        return
    assert stats.median == np.median(finite)
    assert (stats.min, stats.max) == (finite.min(), finite.max())
    assert np.isclose(stats.mean, finite.mean(), rtol=1e-9, atol=1e-6)
    assert (stats.used_mean, stats.used_min, stats.used_max) == (3.0, 3, 3)
    w.abort()


def test_exact_median_of_a_large_master_with_outliers(tmp_path):
    rng = np.random.default_rng(2)
    image = rng.normal(1.0, 0.01, (2000, 1500)).astype(np.float32)  # > 2 M values per bin
    image[0, 0], image[5, 5] = 1e30, -1e30
    w = _written(tmp_path, image)
    assert master_statistics(w, rows=500).median == np.median(image.astype(np.float64))
    assert master_statistics(w, rows=300, workers=2).median == np.median(image.astype(np.float64))
    w.abort()


def test_normalize_in_place(tmp_path):
    image = np.arange(20, dtype=np.float32).reshape(4, 5)
    w = _written(tmp_path, image)
    normalize_in_place(w, 4.0, rows=3)
    np.testing.assert_array_equal(w.read_image(0, 4), image / 4)
    normalize_in_place(w, 0.5, rows=1, workers=3)  # strips on threads
    np.testing.assert_array_equal(w.read_image(0, 4), image / 4 / np.float32(0.5))
    w.abort()


@settings(max_examples=100, deadline=None)
@given(arrays(np.float32, st.integers(1, 50), elements=st.floats(width=32, allow_nan=False,
                                                                  allow_infinity=False)))
def test_keys_order_like_the_values_and_invert(values):
    keys = np.array([_fast._key(b) for b in values.view(np.uint32)], np.uint32)
    order = np.argsort(keys, kind="stable")
    assert (np.diff(values[order].astype(np.float64)) >= 0).all()
    np.testing.assert_array_equal(key_values(keys).view(np.uint32),
                                  values.view(np.uint32))


def test_combine_into_writes_the_master_and_returns_its_exact_statistics(tmp_path):
    """Strips on two threads: the image is the kernel of the whole stack, the streamed
    statistics are those read back from the file and those of numpy. The mean of uint16
    frames runs as running sums, here in strips of 3 rows."""
    reader = _reader(tmp_path, n=5, shape=(37, 11))
    assert reader.dtype == np.uint16
    for kernel, rows, strips in ((Mean(), 3, 13), (MinMax(), 3, 13), (SigmaClip(), 4, 10)):
        w = MasterWriter.create(tmp_path / "c.fits", (37, 11), fits.Header(), fits.Header())
        seen: list[tuple[int, int]] = []
        stats = combine_into(reader, w, kernel, rows=rows, num_workers=2,
                             progress=lambda done, total, seen=seen: seen.append((done, total)))
        image, used = kernel(reader.read(0, 37))
        np.testing.assert_array_equal(w.read_image(0, 37), image)
        # identical whatever the threads and strip heights (a cluster run equals a local one)
        assert stats == master_statistics(w, rows=5) == master_statistics(w, rows=37)
        assert stats.median == np.median(image.astype(np.float64))
        assert (stats.min, stats.max) == (image.min(), image.max())
        assert (stats.used_min, stats.used_max) == (used.min(), used.max())
        assert seen == [(i, strips) for i in range(strips + 1)]
        w.abort()


@pytest.mark.timeout(60, method="thread")
def test_failed_reads_ahead_give_their_buffers_back(tmp_path):
    """Around the page cache each worker has two buffers, read ahead. A read that fails
    must hand its buffer on: when both of a worker's buffers went to failed reads, the
    next strip was never read and a worker waiting for it waited forever (a build with a
    frame truncated after the inventory hung, now and then, instead of failing)."""
    from stacker.combine import StripBlocks
    from stacker.errors import FrameReadError

    rng = np.random.default_rng(1)
    frames = []
    for i in range(3):
        path = tmp_path / f"t{i}.fits"
        fits.PrimaryHDU(rng.integers(0, 65535, (40, 300)).astype(np.uint16)).writeto(path)
        frames.append(read_frame(path, kind="bias"))
    with open(frames[1].path, "r+b") as fh:
        fh.truncate(frames[1].data_offset + 9 * frames[1].row_nbytes)  # rows 9.. are gone
    reader = StripReader(tuple(frames), direct=True)
    strips = plan_strips(40, 4)
    blocks = StripBlocks(reader, None, strips, np.uint16, workers=1)
    try:
        for k, (y0, y1) in enumerate(strips):
            if y1 <= 9:
                buffer, block = blocks.take(k)
                np.testing.assert_array_equal(block[0], fits.getdata(frames[0].path)[y0:y1])
                blocks.give(buffer)
            else:  # strip 2 onwards: every read fails, and each failure is told, not awaited
                with pytest.raises(FrameReadError, match=r"t1\.fits"):
                    blocks.take(k)
    finally:
        blocks.close()
