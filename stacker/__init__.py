"""stacker: memory-bounded master calibration frames for CMOS astro cameras."""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["MasterFrameCreator", "Status", "__version__"]


def __getattr__(name: str):
    # Lazy: `stacker --help` must not pay for importing numpy, astropy and dask.
    if name in ("MasterFrameCreator", "Status"):
        from stacker import api

        return getattr(api, name)
    raise AttributeError(f"module 'stacker' has no attribute {name!r}")
