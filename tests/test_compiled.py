"""The kernels compiled ahead of time (`stacker.compiled`, built by setup.py) against numba's
compilation of the same source, their argument checks, and the runs they keep numba out of."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stacker import _fast, compiled
from stacker.combine import KEY_BINS
from stacker.frames import read_frame
from stacker.io import StripReader, _staging

ROOT = Path(__file__).resolve().parent.parent

needs_ahead = pytest.mark.skipif(not compiled.ahead_of_time(),
                                 reason="stacker._aot was not built (see setup.py)")


def test_the_extension_was_built_where_it_is_required():
    """CI (``.ci/run``) requires the module: a build that silently fell back to numba
    would otherwise only show in the benchmarks."""
    if os.environ.get("STACKER_REQUIRE_AOT") != "1":
        pytest.skip("STACKER_REQUIRE_AOT is not set")
    assert compiled.ahead_of_time(), "stacker._aot was not built: `pip install -e .` says why"


def _both(name: str, make_args):
    """Run kernel `name` compiled ahead of time and numba's on equal fresh arguments; their
    results and every argument afterwards (the outputs among them)."""
    ahead = compiled.kernel(name).ahead
    runs = []
    for fn in (ahead, getattr(_fast, name)):
        args = make_args()
        result = fn(*args)
        runs.append((result, args))
    return runs


def _assert_same_values(got, want) -> None:
    if isinstance(want, np.ndarray):
        np.testing.assert_array_equal(got, want, strict=True)
    elif isinstance(want, tuple):
        assert isinstance(got, tuple) and len(got) == len(want)
        for g, w in zip(got, want, strict=True):
            _assert_same_values(g, w)
    else:
        assert type(got) is type(want) and (got == want or (got != got and want != want))


def _assert_same(runs) -> None:
    """Both runs of `_both` gave the same result and left the same arguments."""
    (r1, a1), (r2, a2) = runs
    _assert_same_values(r1, r2)
    for x, y in zip(a1, a2, strict=True):
        _assert_same_values(x, y)


shapes = st.tuples(st.integers(1, 40), st.integers(1, 70))


@needs_ahead
@settings(max_examples=25, deadline=None)
@given(shapes, st.integers(1, 40), st.integers(0, 1), st.integers(0, 1), st.integers(0, 2**32))
def test_finish_rows_ahead_equals_numba(shape, n, nlow, nhigh, seed):
    rng = np.random.default_rng(seed)
    frames = rng.integers(0, 65536, size=(n, *shape), dtype=np.uint16)

    def args():
        return (frames.sum(0, dtype=np.int32), frames.min(0), frames.max(0), n, nlow, nhigh,
                np.empty(shape, np.float32), np.empty(shape, np.uint16))
    _assert_same(_both("finish_rows", args))


def _image(rng, shape, nan_fraction=0.05):
    image = rng.normal(1000, 300, size=shape).astype(np.float32)
    image[rng.random(shape) < nan_fraction] = np.nan
    return image


@needs_ahead
@settings(max_examples=25, deadline=None)
@given(shapes, st.integers(0, 2**32))
def test_summarize_and_low_histogram_ahead_equal_numba(shape, seed):
    rng = np.random.default_rng(seed)
    image = _image(rng, shape)

    def summary():
        return (image.copy(), image.view(np.uint32).copy(), np.zeros(KEY_BINS, np.int64),
                np.zeros(shape[0]), np.zeros(shape[0]))
    _assert_same(_both("summarize", summary))
    words = image.view(np.uint32).ravel().copy()
    bins = sorted(int(b) for b in rng.choice(KEY_BINS, 2))

    def low():
        return (words.copy(), bins[0], bins[1], np.zeros((2, KEY_BINS), np.int64))
    _assert_same(_both("low_histogram", low))


@needs_ahead
@settings(max_examples=25, deadline=None)
@given(st.integers(1, 50), st.integers(1, 50), st.integers(1, 9), st.integers(0, 2**32))
def test_block_profile_sums_ahead_equals_numba(ny, nx, factor, seed):
    """A whole image in strips of random heights, as `stacker.images.ProfileSums` adds it."""
    rng = np.random.default_rng(seed)
    image = _image(rng, (ny, nx), 0.02)
    cuts = sorted({0, ny, *rng.integers(0, ny, 3).tolist()})
    nby, nbx = -(-ny // factor), -(-nx // factor)
    results = []
    for fn in (compiled.kernel("block_profile_sums").ahead, _fast.block_profile_sums):
        state = (np.zeros(nx), np.zeros(nx + 1, np.int64), np.zeros((nby, nbx)),
                 np.zeros((nby, nbx), np.int64), np.zeros(ny), np.zeros(ny, np.int64),
                 np.zeros(nx), np.zeros(nx, np.int64))
        for y0, y1 in itertools.pairwise(cuts):
            fn(image[y0:y1], y0, ny, factor, *state)
        results.append(state)
    for x, y in zip(*results, strict=True):
        np.testing.assert_array_equal(x, y, strict=True)


@needs_ahead
@settings(max_examples=25, deadline=None)
@given(shapes, st.floats(0.001, 2), st.booleans(), st.integers(0, 2**32))
def test_heat_rgb_and_histogram_ahead_equal_numba(shape, top, inclusive, seed):
    rng = np.random.default_rng(seed)
    fraction = _image(rng, shape).astype(np.float64) / 2000
    _assert_same(_both("heat_rgb", lambda: (fraction.copy(), top,
                                            np.empty((*shape, 3), np.uint8))))
    values = _image(rng, shape).ravel()
    edges = np.linspace(500, 1500, 17)
    _assert_same(_both("histogram", lambda: (values.copy(), edges.copy(), inclusive,
                                             np.zeros(16, np.int64))))


@needs_ahead
def test_read_fits_sums_ahead_equals_numba(fitsfile):
    data = [np.random.default_rng(i).integers(0, 65536, size=(37, 11), dtype=np.uint16)
            for i in range(6)]
    frames = tuple(read_frame(fitsfile(f"s{i}.fits", d, IMAGETYP="Dark Frame", EXPTIME=1.0))
                   for i, d in enumerate(data))
    with StripReader(frames).kept_open() as kept:
        fds, offsets, row, _ = kept._pieces()
        step = 4  # several pieces per strip

        def args():
            return (fds, offsets, row, 5, step, _staging(step * row).view(np.uint16).copy(),
                    np.zeros((30, 11), np.int32), np.full((30, 11), 65535, np.uint16),
                    np.zeros((30, 11), np.uint16), True)
        runs = _both("read_fits_sums", args)
    _assert_same([(r, a[6:9]) for r, a in runs])
    total, vmin, vmax = runs[0][1][6:9]
    stack = np.stack(data)[:, 5:35]
    np.testing.assert_array_equal(total, stack.sum(0))
    np.testing.assert_array_equal(vmin, stack.min(0))
    np.testing.assert_array_equal(vmax, stack.max(0))


@needs_ahead
def test_arguments_of_another_type_go_to_numba_not_the_compiled_code():
    """Compiled ahead of time, a kernel would read a float64 array as float32, an int64 one
    as int32, or a strided one as contiguous (or crash): such calls get numba's version,
    which gives the right answer."""
    values = np.random.default_rng(3).normal(size=1000)
    edges = np.linspace(-2, 2, 9)
    want = np.histogram(values[np.abs(values) <= 2], edges)[0]
    histogram = compiled.kernel("histogram")
    for v in (values, values.astype(np.float32)[::2], values.astype(np.float32)[::-1].copy()):
        counts = np.zeros(8, np.int64)
        histogram(v, edges, True, counts)
        np.testing.assert_array_equal(counts, np.histogram(v[np.abs(v) <= 2], edges)[0])
    assert want.sum() > 900
    # what crashed the compiled code: a list, or int64 file descriptors for int32
    assert not any(compiled._check("f4[::1]")(v) for v in (list(values), values[::2]))
    assert not compiled._check("i4[::1]")(np.zeros(3, np.int64))
    assert not compiled._check("i8")(True) and compiled._check("i8")(np.int32(3))
    strided = np.random.default_rng(4).random((6, 10))[:, ::2] * 0.5
    out = np.empty((6, 5, 3), np.uint8)
    compiled.kernel("heat_rgb")(strided, 0.5, out)
    want_rgb = np.empty_like(out)
    _fast.heat_rgb(strided.copy(), 0.5, want_rgb)
    np.testing.assert_array_equal(out, want_rgb)


def test_a_module_compiled_from_other_code_is_not_used(tmp_path):
    """A digest of stacker._fast's source is compiled into the module: after an edit (or a
    checkout) the kernels come from numba until the module is rebuilt."""
    if not compiled.ahead_of_time():
        pytest.skip("stacker._aot was not built")
    script = textwrap.dedent("""
        import warnings
        from stacker import compiled
        compiled.source_digest = lambda: 12345
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            print(compiled.ahead_of_time(), compiled.kernel("histogram").__module__)
        print(any("reinstall stacker" in str(w.message) for w in caught))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         check=True, cwd=ROOT).stdout.split()
    assert out == ["False", "stacker._fast", "True"]


_RUN = """
import sys
from stacker import MasterFrameCreator
cfg = {{"master_frames": {{"bias_dir": sys.argv[1] + "/bias", "darks_dir": sys.argv[1] + "/darks",
                         "flats_dir": sys.argv[1] + "/flats", "output_dir": sys.argv[2],
                         "rejection_method": {method!r}, "quality_control": True,
                         "save_individual_masters": True}}}}
status = MasterFrameCreator(cfg).create_all_master_frames()
assert status.success, status.message
print(sorted({{m.split(".")[0] for m in sys.modules if m.startswith(("numba", "llvmlite"))}}))
"""


@pytest.fixture(scope="module")
def raw_set(tmp_path_factory):
    """Bias, darks of two exposures and flats, simulated: every kind of master."""
    from stacker.simulate import CameraModel, SimulationSpec, simulate

    raw = tmp_path_factory.mktemp("compiled") / "raw"
    simulate(raw, SimulationSpec(camera=CameraModel(shape=(60, 90)), n_bias=8,
                                 dark_exposures=(1.0, 10.0), n_darks=8, n_flats=8, seed=4))
    return raw


METHODS = ["sigma_clip", "mean", "minmax", "median"]


@pytest.mark.parametrize("method", METHODS)
def test_a_run_with_quality_control_never_imports_numba(raw_set, tmp_path, method):
    """numba's import and CPU target cost ~0.3 s of every run: a user's default run (every
    kind of master, quality control and metrics on) with each rejection method runs
    entirely on the kernels compiled ahead of time, and with ``STACKER_AOT=0`` on numba's,
    to the same masters."""
    from helpers import read_masters

    masters = {}
    for aot in ("1", "0"):
        env = {**os.environ, "STACKER_AOT": aot}
        out = tmp_path / f"aot{aot}"
        done = subprocess.run([sys.executable, "-c", _RUN.format(method=method), str(raw_set),
                               str(out)], capture_output=True, text=True, env=env, cwd=ROOT,
                              timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        loaded = done.stdout.strip().splitlines()[-1]
        if aot == "1" and compiled.ahead_of_time():
            assert loaded == "[]", f"numba was imported: {loaded}"
        elif aot == "0":
            assert loaded == "['llvmlite', 'numba']"
        masters[aot] = read_masters(out)
    assert masters["1"].keys() == masters["0"].keys() and len(masters["1"]) == 4
    for key, (_, image) in masters["1"].items():
        np.testing.assert_array_equal(image, masters["0"][key][1], strict=True)


def _copies(args: tuple) -> list:
    """Copies of a call's arguments, aliased as they were: an array passed twice (in place,
    or as two views of the same memory) is one copy seen through both views."""
    out: list = []
    for i, a in enumerate(args):
        if not isinstance(a, np.ndarray):
            out.append(a)
            continue
        same = next((j for j in range(i) if isinstance(args[j], np.ndarray)
                     and args[j].ctypes.data == a.ctypes.data
                     and args[j].nbytes == a.nbytes), None)
        out.append(a.copy() if same is None else
                   out[same].view(a.dtype).reshape(a.shape))
    return out


@needs_ahead
@pytest.mark.parametrize(("method", "direct", "options"),
                         [(m, False, {}) for m in METHODS]
                         + [("sigma_clip", True, {}), ("mean", True, {}),
                            ("sigma_clip", False, {"sigma_stddev": "mad_std"}),
                            ("sigma_clip", False, {"sigma_center": "mean"}),
                            ("minmax", False, {"nlow": 2, "nhigh": 1})])
def test_every_kernel_call_of_a_run_gives_numbas_result(raw_set, tmp_path, monkeypatch,
                                                        method, direct, options):
    """Each call a run makes (every kind of master, quality control on; frames read
    through the page cache, or around it as a set larger than memory is) is of a signature
    compiled ahead of time, and gives what numba's version gives on a copy of the same
    arguments: results, and every array it writes (two calls of each signature are
    checked, the others run as usual)."""
    from stacker import MasterFrameCreator, engine

    if direct:
        monkeypatch.setattr(engine, "exceeds_page_cache", lambda nbytes: True)

    real = compiled.kernel
    checked: dict[tuple, int] = {}
    called: set[str] = set()

    def key(args):
        return tuple((type(a), getattr(a, "dtype", None), getattr(a, "ndim", None))
                     for a in args)

    def recording(name):
        run = real(name)

        def call(*args):
            called.add(name)
            k = (name, key(args))
            if checked.get(k, 0) >= 2:
                return run(*args)
            checked[k] = checked.get(k, 0) + 1
            assert name in compiled.AHEAD, f"{name} is not compiled ahead of time"
            assert run.compiled_for(args) is not None, f"{name} fell back to numba: {k}"
            copies = _copies(args)
            want = getattr(_fast, name)(*copies)
            got = run(*args)
            _assert_same_values(got if not isinstance(got, np.ndarray) else got.copy(), want)
            for a, c in zip(args, copies, strict=True):
                if isinstance(a, np.ndarray):
                    np.testing.assert_array_equal(a, c, strict=True, err_msg=name)
            return got
        return call

    monkeypatch.setattr(compiled, "kernel", recording)
    cfg = {"master_frames": {"bias_dir": str(raw_set / "bias"),
                             "darks_dir": str(raw_set / "darks"),
                             "flats_dir": str(raw_set / "flats"), "output_dir": str(tmp_path),
                             "rejection_method": method, "quality_control": True,
                             **options}}
    status = MasterFrameCreator(cfg).create_all_master_frames()
    assert status.success, status.message
    assert {"sample_pass", "neighbour_median", "summarize"} <= called
    assert all(m["stats"]["read_around_page_cache"] == direct
               for m in status.details["masters"])


@needs_ahead
@pytest.mark.parametrize("dtype", [np.uint16, np.float32])
@pytest.mark.parametrize("name", ["sigma_clip", "minmax", "median"])
def test_per_pixel_selections_ahead_equal_numba(name, dtype):
    """The selections run for the MAD spread (recorded above) and beyond the network's
    1024 frames (too many for a test run): a block of each type, NaN in the float one."""
    rng = np.random.default_rng(9)
    block = rng.integers(900, 1100, size=(13, 3, 70)).astype(dtype)
    if dtype == np.float32:
        block[rng.random(block.shape) < 0.05] = np.nan
    extra = {"sigma_clip": (3.0, 2.5, False, True, 10), "minmax": (2, 1), "median": ()}[name]

    def args():
        return (block.copy(), *extra, np.empty((3, 70), np.float32),
                np.empty((3, 70), np.uint16))
    run = compiled.kernel(name)
    assert run.compiled_for(args()) is not None
    got, want = args(), args()
    run(*got)
    getattr(_fast, name)(*want)
    for g, w in zip(got[-2:], want[-2:], strict=True):
        np.testing.assert_array_equal(g, w, strict=True)
