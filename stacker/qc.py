"""Frame validation before combining (``quality_control: true``), from sampled rows.

Every frame of a job is measured on about a million pixels of evenly spaced full rows
(`stacker.combine.sample_rows`): level (median), mean, std, min, max, the fraction of
finite pixels and of pixels at full scale. A frame that would poison the master is left out
with the reason; the measurements go to the status either way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from stacker.errors import FrameReadError
from stacker.frames import Frame
from stacker.io import StripReader

#: A flat with more than this fraction of its sampled pixels at full scale is saturated.
MAX_SATURATED_FRACTION = 0.01
#: A frame with less than this fraction of finite pixels is unusable.
MIN_FINITE_FRACTION = 0.5


@dataclass(frozen=True)
class FrameStats:
    """Statistics of one frame's row sample (after subtracting a master, for flats)."""

    path: str
    median: float
    mean: float
    std: float
    min: float
    max: float
    finite_fraction: float
    saturated_fraction: float
    verdict: str = "ok"

    def to_dict(self) -> dict:
        """JSON-friendly form."""
        return asdict(self)


def full_scale(frame: Frame) -> float | None:
    """The largest value the frame's data type can hold (None for float data)."""
    return {"uint16": 65535.0, "uint8": 255.0, "int16": 32767.0}.get(frame.dtype)


def measure(frame: Frame, values: np.ndarray, raw: np.ndarray | None = None) -> FrameStats:
    """Statistics of one frame's sample; `raw` (before subtraction) decides saturation."""
    raw = values if raw is None else raw
    finite = values[np.isfinite(values)]
    top = full_scale(frame)
    saturated = float(np.mean(raw >= top)) if top is not None else 0.0
    if finite.size == 0:
        nan = float("nan")
        return FrameStats(str(frame.path), nan, nan, nan, nan, nan, 0.0, saturated)
    return FrameStats(str(frame.path), float(np.median(finite)), float(finite.mean()),
                      float(finite.std()), float(finite.min()), float(finite.max()),
                      finite.size / values.size, saturated)


def verdict(frame: Frame, stats: FrameStats) -> str | None:
    """Why a frame must be left out, or None when it is fine."""
    if stats.finite_fraction < MIN_FINITE_FRACTION:
        return f"only {stats.finite_fraction:.0%} of its pixels are finite numbers"
    if stats.std == 0:
        return f"constant frame (every sampled pixel is {stats.min:g}); a dead or blank file"
    if frame.kind == "flat" and stats.saturated_fraction > MAX_SATURATED_FRACTION:
        return (f"saturated: {stats.saturated_fraction:.1%} of its pixels at full scale; "
                "shorten the flat exposure")
    return None


def unreadable(frame: Frame, reason: str) -> FrameStats:
    """The statistics of a frame whose pixels could not be read: NaN, with the reason."""
    nan = float("nan")
    return FrameStats(str(frame.path), nan, nan, nan, nan, nan, 0.0, 0.0, verdict=reason)


def sample_frames(frames: Sequence[Frame], rows: Sequence[int],
                  subtract: np.ndarray | None = None) -> list[FrameStats]:
    """Measure every frame on the same sampled `rows`, one frame in memory at a time.

    A frame whose pixels cannot be read or decoded gets NaN statistics and the reason as its
    verdict, so that it is left out instead of failing the whole group later.
    """
    reader = StripReader(tuple(frames))
    out = []
    for i, frame in enumerate(frames):
        try:
            raw = reader.read_frame_rows(i, rows)
        except FrameReadError as exc:
            out.append(unreadable(frame, exc.reason))
            continue
        values = raw - subtract if subtract is not None else raw
        out.append(measure(frame, values, raw))
    return out
