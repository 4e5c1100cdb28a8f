"""Builds ``stacker._aot``: the kernels of `stacker.compiled.AHEAD`, compiled ahead of time by
``numba.pycc`` from `stacker._fast` (why: `stacker.compiled`). Everything else about the
package is in pyproject.toml.

The module is optional: when it cannot be built (no C compiler, a numba without ``pycc``)
the install goes on without it and numba compiles those kernels at first use, as it does
every other kernel. It is built for the CPU of the machine that installs stacker
(``STACKER_AOT_CPU=host``, the default); set ``STACKER_AOT_CPU=generic`` (or an LLVM CPU
name such as ``x86-64-v3``) to build a wheel for other machines.
"""

from __future__ import annotations

import os
import sys
import warnings

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = os.path.dirname(os.path.abspath(__file__))


class BuildAhead(build_ext):
    """build_ext that compiles ``stacker._aot`` with ``numba.pycc`` (its own compiler and
    linker calls), and leaves it out with a warning when that fails."""

    def build_extension(self, ext: Extension) -> None:
        if ext.name != "stacker._aot":
            super().build_extension(ext)
            return
        target = self.get_ext_fullpath(ext.name)
        try:
            compile_ahead(target)
        except Exception as exc:  # any failure: the kernels are compiled at first use
            warnings.warn(f"stacker._aot not built ({type(exc).__name__}: {exc}); numba "
                          "will compile its kernels at first use instead", stacklevel=1)


def compile_ahead(target: str) -> None:
    """Compile the kernels of `stacker.compiled.AHEAD` into the extension module `target`
    (a path ending in the platform's extension suffix)."""
    # numba's cache of the source tree's kernels is not this build's business.
    os.environ.setdefault("NUMBA_CACHE_DIR", os.path.join(HERE, "build", "numba-cache"))
    sys.path.insert(0, HERE)
    try:
        from numba.pycc import CC

        from stacker import _fast
        from stacker.compiled import AHEAD, MODULE, export_name, numba_signature, source_digest
    finally:
        sys.path.remove(HERE)
    _release_gil()
    cc = CC(MODULE, source_module=_fast)
    cc.output_dir = os.path.dirname(target) or "."
    cc.output_file = os.path.basename(target)
    cc.target_cpu = os.environ.get("STACKER_AOT_CPU", "host")
    cc.verbose = False
    for name, sigs in AHEAD.items():
        for i, sig in enumerate(sigs):
            cc.export(export_name(name, i), numba_signature(sig))(
                _trampoline(getattr(_fast, name), len(sig[1])))
    digest = source_digest()

    def built_from() -> int:
        return digest  # a constant in the compiled code

    cc.export("source_digest", "i8()")(built_from)
    os.makedirs(cc.output_dir, exist_ok=True)
    cc.compile()


def _trampoline(kernel, n: int):
    """A function of `n` arguments that calls numba's `kernel` with them. Exported instead of
    the kernel's Python code so that the kernel compiles with its own options (``fastmath``
    where it has it), as numba's dispatcher would."""
    names = ", ".join(f"a{i}" for i in range(n))
    space = {"kernel": kernel}
    exec(f"def call({names}):\n    return kernel({names})\n", space)
    return space["call"]


def _release_gil() -> None:
    """Make ``numba.pycc``'s Python wrappers release the GIL around each call, as the
    kernels' ``nogil=True`` does under numba: a Dask thread's kernel must not stop the
    other threads (pycc has no option for it, so its compiler's flags get it)."""
    from numba.pycc import compiler

    base = compiler.Flags
    if getattr(base, "stacker_release_gil", False):
        return

    class Flags(base):
        stacker_release_gil = True

        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.release_gil = True

    compiler.Flags = Flags


setup(ext_modules=[Extension("stacker._aot", sources=[])],
      cmdclass={"build_ext": BuildAhead})
