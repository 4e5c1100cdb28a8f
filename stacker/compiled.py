"""The compiled kernels of stacker's streaming paths, compiled ahead of time when they could
be, by numba at first use otherwise.

numba compiles `stacker._fast` when a kernel is first called (from its cache after the first
run), but only after ``import numba`` and the set-up of its CPU target: ~0.3 s of every run,
measured 0.15 s + 0.15-0.18 s on the project's VM, which is most of what a mean of 50 frames
of 4096x4096 costs beyond reading them (the benchmark issue's target is 1.3x the floor of
reading, ~0.5 s there). The kernels in `AHEAD` are therefore also compiled when stacker is
installed (``setup.py``: ``numba.pycc``, for the CPU it is installed on) into the extension
module ``stacker._aot``, which loads in well under a millisecond and never imports numba.
The same source compiles both, so they compute the same values; where the extension was not
built (no C compiler, or a numba without ``pycc``) every kernel comes from `stacker._fast`.

A kernel compiled ahead of time has one signature (`AHEAD`) and trusts it: given another
type of array it would misread memory. `kernel` checks every argument against it on each
call (~2-3 us; a call works on a strip of 50 frames, ~5 ms) and otherwise calls numba's
version, which compiles for whatever it is given.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any

import numpy as np

#: Each kernel compiled ahead of time: its result and argument types, in numba's notation
#: (``u2[:,::1]``: a C-contiguous 2-D uint16 array; ``i8``, ``f8``, ``b1``: int, float,
#: bool). These are the types stacker's callers pass (tests/test_compiled.py checks that the
#: mean and min/max builds use nothing else).
AHEAD: dict[str, tuple[str, tuple[str, ...]]] = {
    "read_fits_sums": ("i8", ("i4[::1]", "i8[::1]", "i8", "i8", "i8", "u2[::1]", "i4[:,::1]",
                              "u2[:,::1]", "u2[:,::1]", "b1")),
    "finish_rows": ("none", ("i4[:,::1]", "u2[:,::1]", "u2[:,::1]", "i8", "i8", "i8",
                             "f4[:,::1]", "u2[:,::1]")),
    "summarize": ("Tuple((i8, f8, f8))", ("f4[:,::1]", "u4[:,::1]", "i8[::1]", "f8[::1]",
                                          "f8[::1]")),
    "low_histogram": ("none", ("u4[::1]", "i8", "i8", "i8[:,::1]")),
    "block_profile_sums": ("none", ("f4[:,::1]", "i8", "i8", "i8", "f8[::1]", "i8[::1]",
                                    "f8[:,::1]", "i8[:,::1]", "f8[::1]", "i8[::1]", "f8[::1]",
                                    "i8[::1]")),
    "heat_rgb": ("none", ("f8[:,::1]", "f8", "u1[:,:,::1]")),
    "histogram": ("none", ("f4[::1]", "f8[::1]", "b1", "i8[::1]")),
}

#: The extension module's name within the package.
MODULE = "_aot"


def numba_signature(name: str) -> str:
    """`AHEAD`'s entry for `name` as the signature string ``numba.pycc`` exports it with."""
    result, args = AHEAD[name]
    return f"{'void' if result == 'none' else result}({', '.join(args)})"


def _check(code: str) -> Callable[[Any], bool]:
    """A test that an argument has the type `code` names, exactly as compiled."""
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
        return lambda a: isinstance(a, (float, np.floating))
    raise ValueError(f"no check for argument type {code!r}")


#: The files whose code the extension compiles: it is out of date when they change.
SOURCES = ("_fast.py", "_registers.py", "compiled.py")


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
    """Kernel `name` of `stacker._fast`: its version compiled ahead of time when `AHEAD` has
    it and the extension was built, behind a check of its arguments; else numba's.

    Parameters
    ----------
    name : str
        A kernel of `stacker._fast`.
    """
    ahead = getattr(_extension(), name, None) if name in AHEAD else None
    if ahead is None:
        from stacker import _fast

        return getattr(_fast, name)
    checks = tuple(_check(code) for code in AHEAD[name][1])

    def call(*args):
        if len(args) == len(checks) and all(c(a) for c, a in zip(checks, args, strict=True)):
            return ahead(*args)
        from stacker import _fast

        return getattr(_fast, name)(*args)

    call.__name__ = call.__qualname__ = name
    call.__doc__ = f"`stacker._fast.{name}`, compiled ahead of time for {numba_signature(name)}"
    call.ahead = ahead
    return call


def ahead_of_time() -> bool:
    """Whether the kernels of `AHEAD` were compiled when stacker was installed."""
    return _extension() is not None
