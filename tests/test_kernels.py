"""Fast kernels against their slow references (hypothesis), plus invariants."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from stacker._fast import GROUP, comparators, network_rows
from stacker.kernels import (
    NETWORK_MAX_FRAMES,
    Mean,
    Median,
    MinMax,
    SigmaClip,
    make_kernel,
    mean_reference,
    median_reference,
    minmax_reference,
    sigma_clip_reference,
)

values = st.one_of(
    st.floats(-1e4, 1e4, width=32),
    st.sampled_from([0.0, 1.0, 2.0, 100.0, np.nan, 6e4]),  # ties, NaN, cosmic-ray-like
)
blocks = arrays(np.float32, st.tuples(st.integers(1, 25), st.integers(1, 3), st.integers(1, 4)),
                elements=values)
integer_blocks = arrays(np.float32, st.tuples(st.integers(1, 25), st.just(2), st.just(3)),
                        elements=st.integers(0, 6).map(float))


def constant(n=7):
    return np.full((n, 2, 2), 5.0, np.float32)


def one_outlier_among(n):
    block = np.zeros((n, 1, 1), np.float32)
    block[0] = 100.0
    return block


def nan_column():
    block = np.arange(18, dtype=np.float32).reshape(6, 1, 3)
    block[:, 0, 1] = np.nan
    return block


ADVERSARIAL = [constant(), constant(1), constant(2), one_outlier_among(10), nan_column(),
               np.array([[[1e30]], [[0.0]], [[-1e30]]], np.float32)]


def assert_same(fast, ref, block):
    image, used = fast
    ref_image, ref_used = ref
    np.testing.assert_array_equal(used, ref_used)
    assert image.dtype == np.float32 and used.dtype == np.uint16
    finite = block[np.isfinite(block)]
    scale = float(np.max(np.abs(finite))) if finite.size else 1.0
    np.testing.assert_allclose(image, ref_image, rtol=1e-5, atol=1e-6 * scale)


sigma_options = st.fixed_dictionaries({
    "sigma_low": st.sampled_from([0.5, 1.0, 2.0, 2.5, 3.0, 5.0]),
    "sigma_high": st.sampled_from([0.5, 1.0, 2.0, 3.0, 4.0]),
    "center": st.sampled_from(["median", "mean"]),
    "stddev": st.sampled_from(["std", "mad_std"]),
    "max_iterations": st.sampled_from([None, 1, 2, 3]),
})


@settings(max_examples=300, deadline=None)
@given(st.one_of(blocks, integer_blocks), sigma_options)
@example(constant(), {})
@example(constant(1), {})
@example(one_outlier_among(10), {"center": "mean", "max_iterations": 1})  # the seed's clip
@example(one_outlier_among(10), {})
@example(nan_column(), {"stddev": "mad_std"})
@example(np.full((4, 1, 1), np.nan, np.float32), {})
@example(np.array([[[1.0]], [[3.638958e-39]], [[0.0]]], np.float32),  # tiny survivors
         {"sigma_low": 0.5, "sigma_high": 1.0})
@example(np.array([[[1.0]], [[1e-6]], [[0.0]]], np.float32),
         {"sigma_low": 1.0, "sigma_high": 0.5, "center": "mean"})
@example(np.array([1, 0, 1, 1, 1e-45, 0, 0, 0], np.float32).reshape(8, 1, 1),  # subnormal MAD
         {"sigma_low": 0.5, "sigma_high": 1.0, "stddev": "mad_std"})
@example(np.array([[[0.0]], [[1.0]]], np.float32), {"center": "mean", "sigma_low": 0.5,
                                                     "sigma_high": 0.5})  # would reject all
@example(np.array([0, 0, -1, -1], np.float32).reshape(4, 1, 1),  # whole numbers below zero:
         {"sigma_low": 0.5, "sigma_high": 0.5, "stddev": "mad_std"})  # the counting median
def test_sigma_clip_matches_reference(block, options):
    assert_same(SigmaClip(**options)(block), sigma_clip_reference(block, **options), block)


@settings(max_examples=200, deadline=None)
@given(st.one_of(blocks, integer_blocks), st.integers(0, 3), st.integers(0, 3))
@example(constant(2), 1, 1)
@example(np.array([[[1e30]], [[5.0]], [[-1e30]], [[7.0]]], np.float32), 1, 1)  # exactness
@example(np.array([[[1e30]], [[1e30]], [[2.0]], [[1.0]]], np.float32), 0, 1)
@example(constant(1), 1, 1)
@example(nan_column(), 2, 0)
def test_minmax_matches_reference(block, nlow, nhigh):
    assert_same(MinMax(nlow, nhigh)(block), minmax_reference(block, nlow, nhigh), block)


@settings(max_examples=200, deadline=None)
@given(st.one_of(blocks, integer_blocks))
@example(nan_column())
@example(constant(1))
def test_median_and_mean_match_reference(block):
    assert_same(Median()(block), median_reference(block), block)
    assert_same(Mean()(block), mean_reference(block), block)


# Sorted tiles hold 64 pixels: widths from 60 to 135 give full tiles, ragged last tiles and
# rows of several tiles; frame counts beyond 32 give networks of more than one merge level.
wide_blocks = arrays(np.float32, st.tuples(st.integers(1, 70), st.integers(1, 2),
                                           st.integers(60, 135)), elements=values)


@settings(max_examples=25, deadline=None)
@given(wide_blocks, sigma_options, st.integers(0, 3), st.integers(0, 3))
def test_kernels_on_rows_of_several_tiles_match_reference(block, options, nlow, nhigh):
    assert_same(SigmaClip(**options)(block), sigma_clip_reference(block, **options), block)
    assert_same(MinMax(nlow, nhigh)(block), minmax_reference(block, nlow, nhigh), block)
    assert_same(Median()(block), median_reference(block), block)


uint16_blocks = arrays(np.uint16, st.tuples(st.integers(1, 70), st.integers(1, 2),
                                            st.integers(1, 135)),
                      elements=st.one_of(st.integers(0, 65535), st.integers(1000, 1004),
                                         st.sampled_from([0, 65535])))


@settings(max_examples=40, deadline=None)
@given(uint16_blocks, sigma_options, st.integers(0, 3), st.integers(0, 3))
def test_uint16_blocks_give_exactly_the_float32_results(block, options, nlow, nhigh):
    """Camera data read as uint16 (no conversion) combine to the very same bits."""
    as_float = block.astype(np.float32)
    for kernel in (SigmaClip(**options), MinMax(nlow, nhigh), Median(), Mean()):
        image, used = kernel(block)
        ref_image, ref_used = kernel(as_float)
        np.testing.assert_array_equal(image, ref_image)
        np.testing.assert_array_equal(used, ref_used)
    assert_same(SigmaClip(**options)(block), sigma_clip_reference(as_float, **options),
                as_float)


@settings(max_examples=60, deadline=None)
@given(uint16_blocks, st.integers(0, 1), st.integers(0, 1))
def test_running_sums_equal_the_kernels_on_the_stacked_rows(block, nlow, nhigh):
    for kernel in (Mean(), MinMax(nlow, nhigh)):
        sums = kernel.running(block.shape[1:])
        for rows in block:
            sums.add(rows)
        image, used = sums.result()
        ref_image, ref_used = kernel(block)
        np.testing.assert_array_equal(image, ref_image)
        np.testing.assert_array_equal(used, ref_used)


def test_only_one_value_each_way_runs_as_sums():
    assert MinMax(2, 0).running((1, 1)) is None and MinMax(1, 1).running((1, 1)) is not None


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 1100), st.integers(0, 2**32 - 1))
@example(1, 0)
@example(NETWORK_MAX_FRAMES, 0)
def test_network_sorts_every_column(n, seed):
    """The tile network (groups sorted and half-cleaned in registers, bitonic merges of
    mirrored rows between them) sorts n values padded with +inf (random data, with ties)."""
    rng = np.random.default_rng(seed)
    rows = network_rows(n)
    assert rows % GROUP == 0 and n <= rows < n + GROUP
    data = np.full((rows, 64), np.inf, np.float32)
    data[:n] = rng.integers(0, max(2, n // 3), (n, 64))
    sorted_ = data.copy()
    for a, b in comparators(n):
        assert 0 <= a < b < rows
        low = np.minimum(sorted_[a], sorted_[b])
        sorted_[b] = np.maximum(sorted_[a], sorted_[b])
        sorted_[a] = low
    np.testing.assert_array_equal(sorted_, np.sort(data, axis=0))


@settings(max_examples=60, deadline=None)
@given(arrays(np.float32, st.tuples(st.integers(1, 40), st.just(1), st.integers(1, 130)),
              elements=st.floats(width=32) | st.sampled_from([-0.0, 0.0, np.inf, -np.inf])),
       st.sampled_from([np.float32, np.uint16]))
# neighbouring negative floats, which differ in their last bit only
@example(-np.nextafter(np.float32(1), np.float32(2)) ** np.float32([3, 0, 4, 1, 2])
         .reshape(5, 1, 1), np.float32)
def test_compiled_tiles_sort_like_numpy(block, dtype):
    """The compiled tile sort (float32 as order-preserving integer keys) orders every column
    as np.sort does, NaN as the +inf fill, including -0.0, infinities and subnormals."""
    from stacker._fast import TILE, _new_tile, _sorted_tile, network
    from stacker.kernels import _fill

    if dtype == np.uint16:
        block = np.nan_to_num(block, nan=0, posinf=0, neginf=0)
        block = np.abs(block).clip(0, 65535).astype(np.uint16)
    n, _, w = block.shape
    tile = _new_tile(n, _fill(block))
    count = np.empty(TILE, np.int64)
    for x0 in range(0, w, TILE):
        _sorted_tile(block, 0, x0, *network(n), _fill(block), tile, count)
        m = min(TILE, w - x0)
        part = block[:, 0, x0:x0 + m]
        expected = np.sort(np.where(np.isnan(part), np.inf, part) if dtype != np.uint16
                           else part, axis=0)
        np.testing.assert_array_equal(tile[:n, :m], expected)
        assert (tile[n:] == _fill(block)).all()  # the padding sorts last and stays
        if dtype != np.uint16:
            np.testing.assert_array_equal(count[:m], (~np.isnan(part)).sum(axis=0))


@pytest.mark.parametrize("n", [*range(1, 21), 31, 33])
def test_network_sorts_every_zero_one_sequence(n):
    """The 0-1 principle: a network that sorts all 2^k sequences of 0 and 1 sorts anything.
    Up to 20 values (a group, and a merge of two groups of which the second is mostly
    padding); 31 and 33 on random sequences only, 2^16 of them."""
    rows = network_rows(n)
    if n <= 20:
        data = ((np.arange(2**n)[None, :] >> np.arange(n)[:, None]) & 1).astype(np.int8)
    else:
        data = np.random.default_rng(n).integers(0, 2, (n, 2**16)).astype(np.int8)
    data = np.concatenate([data, np.ones((rows - n, data.shape[1]), np.int8)])
    for a, b in comparators(n):
        low = np.minimum(data[a], data[b])
        data[b] = np.maximum(data[a], data[b])
        data[a] = low
    assert (np.diff(data, axis=0) >= 0).all()


def test_register_kernels_are_the_generated_source():
    """`stacker._registers` is generated: the file must be what its generator writes."""
    from pathlib import Path

    from stacker import _fast, _registers

    assert Path(_registers.__file__).read_text() == _fast.register_source(), (
        "regenerate stacker/_registers.py from stacker._fast.register_source()")


@pytest.mark.parametrize("n", [16, 32, 17])
def test_a_missing_value_after_a_tile_of_whole_groups_is_left_out(n):
    """With N a multiple of the group, the tile has no padding row: a missing value must
    still become +inf, not whatever the previous tile's last row held (a row of NaN after
    a row with a 1 gave 1/15 instead of 0)."""
    block = np.zeros((n, 2, 60), np.float32)
    block[0, 0, 0] = 1
    block[0, 1, 0] = np.nan
    kernel = SigmaClip(sigma_low=0.5, sigma_high=0.5)
    assert_same(kernel(block), sigma_clip_reference(block, 0.5, 0.5), block)
    assert_same(MinMax(0, 0)(block), minmax_reference(block, 0, 0), block)


def test_sigma_clip_sums_again_when_the_rejected_values_held_the_sum_of_squares():
    """A clip iteration subtracts what it rejected from the running moments; when that was
    nearly all of the sum of squares (a 1e18 outlier: its square's rounding is as large as
    all the other terms, values of ~2e9), the difference would be rounding noise, and the
    kept values are summed again instead (without: 47 frames kept instead of 49 here)."""
    block = np.random.default_rng(0).normal(0, 2e9, (50, 1, 8)).astype(np.float32)
    block[7] = 1e18
    assert_same(SigmaClip()(block), sigma_clip_reference(block), block)


@pytest.mark.parametrize("n", [255, 256, 257, NETWORK_MAX_FRAMES])
def test_sorted_kernels_across_every_merge_level(n):
    """Stacks whose network has 5 to 7 merge levels (the hypothesis blocks stop at 70
    frames): compiled, float32 and uint16, equal to the references."""
    rng = np.random.default_rng(n)
    block = rng.normal(100, 5, (n, 1, 70)).astype(np.float32)
    block[::7, 0, 3] = np.nan
    block[0, 0, 5] = 6e4
    assert_same(SigmaClip()(block), sigma_clip_reference(block), block)
    assert_same(MinMax(2, 3)(block), minmax_reference(block, 2, 3), block)
    assert_same(Median()(block), median_reference(block), block)
    camera = np.nan_to_num(np.round(block), nan=7).astype(np.uint16)
    for kernel in (SigmaClip(), MinMax(2, 3), Median()):
        for got, expected in zip(kernel(camera), kernel(camera.astype(np.float32)),
                                 strict=True):
            np.testing.assert_array_equal(got, expected)


def test_stacks_beyond_the_network_use_selections_with_the_same_result():
    rng = np.random.default_rng(3)
    block = np.round(rng.normal(100, 5, (NETWORK_MAX_FRAMES + 7, 1, 3))).astype(np.float32)
    block[::97, 0, 1] = 6e4
    block[5, 0, 2] = np.nan
    assert_same(SigmaClip()(block), sigma_clip_reference(block), block)
    assert_same(MinMax(2, 2)(block), minmax_reference(block, 2, 2), block)
    assert_same(Median()(block), median_reference(block), block)


@pytest.mark.parametrize("block", ADVERSARIAL)
@pytest.mark.parametrize("method", ["sigma_clip", "minmax", "median", "mean"])
def test_every_kernel_on_adversarial_blocks(block, method):
    image, used = make_kernel(method)(block)
    assert image.shape == block.shape[1:] and used.shape == block.shape[1:]
    assert (used <= block.shape[0]).all()
    assert (np.isnan(image) == (used == 0)).all()


def test_all_nan_pixel_is_nan_with_zero_frames():
    block = np.full((5, 1, 2), np.nan, np.float32)
    block[:, 0, 1] = 3.0
    for method in ("sigma_clip", "minmax", "median", "mean"):
        image, used = make_kernel(method)(block)
        assert np.isnan(image[0, 0]) and used[0, 0] == 0
        assert image[0, 1] == 3.0 and used[0, 1] == (3 if method == "minmax" else 5)


def test_cosmic_ray_is_removed_by_clipping_but_biases_the_mean():
    rng = np.random.default_rng(0)
    block = rng.normal(500, 3, (20, 8, 8)).astype(np.float32)
    block[4, 2, 3] = 30000  # a cosmic-ray hit in one frame
    clipped, used = SigmaClip()(block)
    mean, _ = Mean()(block)
    assert abs(clipped[2, 3] - 500) < 5 and used[2, 3] == 19
    assert mean[2, 3] > 1900


def test_single_pass_mean_clip_is_blind_to_one_outlier_in_ten_frames():
    """The seed's clip: one outlier among 10 frames sits exactly at 3 std and stays."""
    block = one_outlier_among(10)
    _, used = SigmaClip(center="mean", max_iterations=1)(block)
    assert used[0, 0] == 10
    _, used = SigmaClip()(block)  # median centre: rejected
    assert used[0, 0] == 9


def test_minmax_with_two_frames_is_the_mean():
    block = np.array([[[1.0]], [[3.0]]], np.float32)
    image, used = MinMax()(block)
    assert image[0, 0] == 2.0 and used[0, 0] == 2


def test_minmax_drops_exactly_nlow_and_nhigh():
    block = np.arange(10, dtype=np.float32).reshape(10, 1, 1)
    image, used = MinMax(nlow=2, nhigh=3)(block)
    assert used[0, 0] == 5 and image[0, 0] == np.mean([2, 3, 4, 5, 6])


def test_kernels_are_frozen_picklable_and_validated():
    k = SigmaClip(sigma_low=2.0, center="mean")
    assert pickle.loads(pickle.dumps(k)) == k
    with pytest.raises(AttributeError):
        k.sigma_low = 1.0  # type: ignore[misc]
    for bad, match in [({"sigma_low": 0}, "sigma_low"), ({"sigma_high": -1}, "sigma_high"),
                       ({"center": "mode"}, "center"), ({"stddev": "iqr"}, "stddev"),
                       ({"max_iterations": 0}, "max_iterations")]:
        with pytest.raises(ValueError, match=match):
            SigmaClip(**bad)
    with pytest.raises(ValueError, match="nlow"):
        MinMax(nlow=-1)
    with pytest.raises(ValueError, match="unknown method"):
        make_kernel("kappa")


def test_numba_start_up_skips_scipy_linalg_only_while_setting_up(tmp_path):
    """Numba's target set-up would import scipy.linalg (0.35-0.4 s) when scipy is installed;
    stacker hides it during that set-up only: afterwards scipy.linalg imports as usual, the
    hook is gone and numba's BLAS-backed np.dot still compiles."""
    import subprocess
    import sys
    import textwrap

    # A stand-in scipy that records when its linalg is imported (numba checks __version__).
    (tmp_path / "scipy" / "linalg").mkdir(parents=True)
    (tmp_path / "scipy" / "__init__.py").write_text("__version__ = '1.17.0'\n")
    (tmp_path / "scipy" / "linalg" / "__init__.py").write_text(
        "import os\nopen(os.environ['LINALG_MARK'], 'a').write('imported\\n')\n")
    mark = tmp_path / "mark"
    script = textwrap.dedent("""
        import sys
        import stacker._fast
        assert "scipy.linalg" not in sys.modules, "numba's set-up imported scipy.linalg"
        assert not any(type(f).__name__.startswith("_NoScipy") for f in sys.meta_path)
        import scipy.linalg
        import numba, numpy as np
        print(numba.njit(lambda a: a.sum())(np.ones(3)))
    """)
    env = {**__import__("os").environ, "PYTHONPATH": str(tmp_path), "LINALG_MARK": str(mark)}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "3.0"
    assert mark.read_text() == "imported\n"  # once: by the script, after stacker's set-up
