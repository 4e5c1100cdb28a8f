"""stacker's compiled kernels: compiled ahead of time when stacker was installed, by numba at
first use otherwise.

numba compiles `stacker._fast` when a kernel is first called (from its cache after the first
run), but only after ``import numba`` and the set-up of its CPU target: ~0.3 s of every run,
measured 0.15 s + 0.15-0.18 s on the project's VM, which was most of what a mean of 50
frames of 4096x4096 cost beyond reading them (the benchmark issue's target is 1.3x the
floor of reading, ~0.5 s there), and ~150 MB of memory. The kernels in `AHEAD` — every one
a run calls with the built-in rejection methods, quality control and metrics — are
therefore also compiled when stacker is installed (``setup.py``: ``numba.pycc``, for the CPU
it is installed on) into the extension module ``stacker._aot``, which loads in well under a
millisecond and never imports numba. The same source compiles both, so they compute the
same values (tests/test_compiled.py replays a run's calls on numba's versions); where the
extension was not built (no C compiler, or a numba without ``pycc``) every kernel comes
from `stacker._fast`.

A kernel compiled ahead of time has a fixed list of signatures (`AHEAD`) and trusts them:
given another type of array it would misread memory, or crash. `kernel` checks every
argument against them on each call (~2-3 us; a call works on a strip or a frame's sample,
milliseconds) and otherwise calls numba's version, which compiles for whatever it is given
(a user's own kernel arguments, say).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any

import numpy as np

#: Each kernel compiled ahead of time, with the signatures it is compiled for: result and
#: argument types in numba's notation (``u2[:,::1]``: a C-contiguous 2-D uint16 array;
#: ``i8``, ``f8``, ``b1``: int, float, bool; ``f4``, ``u2``: numpy float32 and uint16
#: scalars). These are the types stacker's callers pass in a run of every kind of master
#: with each rejection method and quality control (tests/test_compiled.py records such a
#: run's calls and checks that each is one of them, and gives numba's result).
Sig = tuple[str, tuple[str, ...]]
_TILE_SORT = ("i8[:,::1]", "i8[::1]")  # a sorting network (`stacker.sorting.network`)
AHEAD: dict[str, tuple[Sig, ...]] = {
    # reading camera data (through the page cache or around it), and the running sums of a
    # mean or min/max
    "read_fits_sums": (("i8", ("i4[::1]", "i8[::1]", "i8", "i8", "i8", "u2[::1]", "i4[:,::1]",
                               "u2[:,::1]", "u2[:,::1]", "b1")),),
    "read_fits_uint16": (("i8", ("i4[::1]", "i8[::1]", "i8", "i8", "i8", "u2[:,:,::1]")),),
    "read_fits_calibrated": (("i8", ("i4[::1]", "i8[::1]", "i8", "i8", "i8", "u2[::1]",
                                     "f4[:,::1]", "b1", "f4[::1]", "f4[:,:,::1]")),),
    "uint16_from_fits": tuple(("none", ("u2[:,::1]", f"{t}[:,::1]")) for t in ("f4", "u2")),
    "uint16_calibrated": (("none", ("u2[:,::1]", "f4[:,::1]", "b1", "f4", "f4[:,::1]")),),
    "add_rows": (("none", ("u2[:,::1]", "i4[:,::1]", "u2[:,::1]", "u2[:,::1]", "b1")),),
    "finish_rows": (("none", ("i4[:,::1]", "u2[:,::1]", "u2[:,::1]", "i8", "i8", "i8",
                              "f4[:,::1]", "u2[:,::1]")),),
    # rejection of a block of frames
    "mean_rows": (("none", ("f4[:,:,::1]", "i8", "i8", "f4[:,::1]", "u2[:,::1]")),),
    "sigma_clip_sorted": tuple(
        ("none", (f"{t}[:,:,::1]", *_TILE_SORT, t, "f8", "f8", "b1", "i8", "f4[:,::1]",
                  "u2[:,::1]")) for t in ("u2", "f4")),
    "trimmed_sorted": tuple(
        ("none", (f"{t}[:,:,::1]", *_TILE_SORT, t, "i8", "i8", "b1", "f4[:,::1]",
                  "u2[:,::1]")) for t in ("u2", "f4")),
    # per-pixel selections: the MAD spread, and beyond the network's 1024 frames
    "sigma_clip": tuple(("none", (f"{t}[:,:,::1]", "f8", "f8", "b1", "b1", "i8", "f4[:,::1]",
                                  "u2[:,::1]")) for t in ("u2", "f4")),
    "minmax": tuple(("none", (f"{t}[:,:,::1]", "i8", "i8", "f4[:,::1]", "u2[:,::1]"))
                    for t in ("u2", "f4")),
    "median": tuple(("none", (f"{t}[:,:,::1]", "f4[:,::1]", "u2[:,::1]")) for t in ("u2", "f4")),
    # the master's statistics and the report's pictures
    "summarize": (("Tuple((i8, f8, f8))", ("f4[:,::1]", "u4[:,::1]", "i8[::1]", "f8[::1]",
                                           "f8[::1]")),),
    "low_histogram": (("none", ("u4[::1]", "i8", "i8", "i8[:,::1]")),),
    "block_profile_sums": (("none", ("f4[:,::1]", "i8", "i8", "i8", "f8[::1]", "i8[::1]",
                                     "f8[:,::1]", "i8[:,::1]", "f8[::1]", "i8[::1]",
                                     "f8[::1]", "i8[::1]")),),
    "heat_rgb": (("none", ("f8[:,::1]", "f8", "u1[:,:,::1]")),),
    "histogram": (("none", ("f4[::1]", "f8[::1]", "b1", "i8[::1]")),),
    # quality control: frames' samples, and the masters' metrics
    "sample_pass": (("Tuple((i8, f8, f8, f8, f8, i8))", ("f4[::1]", "f4[::1]", "f8",
                                                         "f4[::1]", "f4[::1]", "f4[::1]")),),
    "count_values": (("b1", ("f4[::1]", "i8[::1]")),),
    "counted_medians": (("UniTuple(f4, 2)", ("i8[::1]", "i8")),),
    "median_in_place": (("f4", ("f4[::1]",)),),
    "deviation_median": (("f4", ("f4[::1]", "f4", "f4[::1]")),),
    "window_moments": tuple(("Tuple((i8, f8, f8))", (f"{t}[::1]", t, t)) for t in ("f4", "f8")),
    "neighbour_median": (("f4[:,::1]", ("f4[:,::1]", "i8", "f4[:,::1]")),),
    "count_above": (("none", ("u2[:,:,::1]", "i8[::1]", "f8[::1]", "f8[::1]", "i8[::1]")),),
    "label8": (("i8", ("b1[:,::1]", "i8[:,::1]")),),
}

#: The extension module's name within the package.
MODULE = "_aot"


def export_name(name: str, i: int) -> str:
    """The extension's name for signature `i` of kernel `name`."""
    return name if i == 0 else f"{name}__{i}"


def numba_signature(sig: Sig) -> str:
    """A signature of `AHEAD` as the string ``numba.pycc`` exports it with."""
    result, args = sig
    return f"{'void' if result == 'none' else result}({', '.join(args)})"


def _check(code: str) -> Callable[[Any], bool]:
    """A test that an argument has the type `code` names, exactly as compiled: numba would
    compile another version for anything else (a float32 scalar for ``f8``, say), whose
    results may differ."""
    if "[" in code:
        dtype = np.dtype(code[: code.index("[")])
        ndim = code.count(",") + 1

        def array(a: Any) -> bool:
            return (type(a) is np.ndarray and a.dtype == dtype and a.ndim == ndim
                    and a.flags.c_contiguous and a.flags.aligned)
        return array
    if code == "b1":
        return lambda a: isinstance(a, (bool, np.bool_))
    if code == "i8":
        return lambda a: isinstance(a, (int, np.integer)) and not isinstance(a, bool) \
            and -2**63 <= a < 2**63
    if code == "f8":
        return lambda a: isinstance(a, float)  # np.float64 too, not np.float32
    scalar = {"f4": np.float32, "u2": np.uint16}.get(code)
    if scalar is not None:
        return lambda a: type(a) is scalar
    raise ValueError(f"no check for argument type {code!r}")


#: The files whose code the extension compiles: it is out of date when they change.
SOURCES = ("_fast.py", "_registers.py", "sorting.py", "compiled.py")


def source_digest() -> int:
    """A 62-bit digest of `SOURCES` as they are now: built into the extension (its
    ``source_digest()``), so that a module compiled from an older `stacker._fast` is never
    used (a developer's edit takes effect at once; ``make`` rebuilds the module)."""
    import hashlib

    here = os.path.dirname(os.path.abspath(__file__))
    h = hashlib.sha256()
    for name in SOURCES:
        with open(os.path.join(here, name), "rb") as fh:
            h.update(fh.read())
    return int.from_bytes(h.digest()[:8], "little") >> 2


@functools.cache
def _extension():
    """``stacker._aot``, or None when it was not built or ``STACKER_AOT=0`` is set (every
    kernel from numba then: to compare the two, or to rule the module out)."""
    if os.environ.get("STACKER_AOT") == "0":
        return None
    try:
        from stacker import _aot
    except ImportError:
        return None
    if _aot.source_digest() != source_digest():
        import warnings

        warnings.warn("stacker._aot was compiled from another version of stacker._fast and is "
                      "not used (numba compiles the kernels instead); reinstall stacker "
                      "(`make` does) to rebuild it", stacklevel=2)
        return None
    return _aot


@functools.cache
def kernel(name: str) -> Callable[..., Any]:
    """Kernel `name` of `stacker._fast`: its versions compiled ahead of time when `AHEAD` has
    it and the extension was built, behind a check of the arguments; else numba's.

    Parameters
    ----------
    name : str
        A kernel of `stacker._fast`.
    """
    extension = _extension() if name in AHEAD else None
    if extension is None:
        from stacker import _fast

        return getattr(_fast, name)
    versions = tuple((tuple(_check(code) for code in args),
                      getattr(extension, export_name(name, i)))
                     for i, (_, args) in enumerate(AHEAD[name]))

    def compiled_for(args: tuple) -> Callable[..., Any] | None:
        for checks, fn in versions:
            if len(args) == len(checks) and all(c(a) for c, a in zip(checks, args,
                                                                       strict=True)):
                return fn
        return None

    def call(*args):
        fn = compiled_for(args)
        if fn is None:
            from stacker import _fast

            fn = getattr(_fast, name)
        return fn(*args)

    call.__name__ = call.__qualname__ = name
    call.__doc__ = (f"`stacker._fast.{name}`, compiled ahead of time for "
                    + "; ".join(numba_signature(sig) for sig in AHEAD[name]))
    call.ahead = versions[0][1]
    call.compiled_for = compiled_for
    return call


def __getattr__(name: str) -> Callable[..., Any]:
    """A kernel as an attribute, `kernel(name)`: ``from stacker.compiled import sample_pass``
    where ``from stacker._fast import sample_pass`` would import numba."""
    if name.startswith("_"):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return kernel(name)


def ahead_of_time() -> bool:
    """Whether the kernels of `AHEAD` were compiled when stacker was installed."""
    return _extension() is not None
