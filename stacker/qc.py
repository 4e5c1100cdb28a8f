"""Frame validation before combining (``quality_control: true``), from sampled rows.

Every frame of a job is measured on about 262 000 pixels of evenly spaced full rows
(`stacker.combine.sample_rows`, `FRAME_SAMPLE_PIXELS`): level (median and 5-sigma clipped
mean), mean, std, noise (std after clipping), min, max, the fraction of finite pixels and of
pixels at full scale, and for flats a coarse 4x4 grid of zone levels (the frame's
large-scale shape). `judge` then gives every frame a verdict: ``"ok"`` or the reason it is
left out. Reasons, in the order they are tried:

1. data range: mostly NaN/inf (``qc_min_finite_fraction``), constant or all-zero, a flat
   above ``qc_flat_max_level`` of full scale or with more than ``qc_saturated_fraction`` of
   its pixels saturated, a flat with no signal after subtracting its master;
2. header consistency with its group: exposure, gain, offset, binning, and (bias, darks)
   CCD-TEMP within ``temperature_tolerance`` of the group's median;
3. outliers (``qc_outlier_sigma``): a robust z-score against the group's other frames,
   ``z = (x - median) / max(1.4826 MAD, floor)``. Bias and darks are judged by their level
   (a light leak) and noise; flats by their shape, because a twilight flat's level changes
   from frame to frame by design (the engine scales it away) while its normalized pattern
   (vignetting, dust) must not: a cloud or a gradient changes the shape. This is what
   PixInsight's and Siril's users expect: level-scaled flats, frames judged after scaling.
   The floors keep a perfectly steady group from turning quantization steps into outliers:
   a tenth of the per-pixel noise for levels, 5 % of it for noise, 0.2 % for shapes.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING

import numpy as np

from stacker.errors import FrameReadError
from stacker.frames import Frame
from stacker.io import ReadAhead, StripReader

if TYPE_CHECKING:
    from stacker.config import Settings
    from stacker.plan import Job

#: Robust sigma of a Gaussian from its median absolute deviation.
MAD_TO_SIGMA = 1.4826
#: Zones per axis of a flat's shape grid.
SHAPE_ZONES = 4
#: Floors of the group spread used in z-scores (see the module docstring).
LEVEL_FLOOR_NOISE = 0.1
NOISE_FLOOR_NOISE = 0.05
SHAPE_FLOOR = 0.002


@dataclass(frozen=True)
class FrameStats:
    """Statistics of one frame's row sample (after subtracting a master, for flats).

    ``z_level``, ``z_noise`` and ``z_shape`` are robust z-scores against the frame's group
    (None when not computed); `verdict` is ``"ok"`` or why the frame was left out.
    """

    path: str
    median: float
    mean: float
    std: float
    min: float
    max: float
    finite_fraction: float
    saturated_fraction: float
    verdict: str = "ok"
    level: float = float("nan")
    noise: float = float("nan")
    full_scale_fraction: float | None = None
    z_level: float | None = None
    z_noise: float | None = None
    z_shape: float | None = None
    zones: tuple[float, ...] = ()

    @property
    def ok(self) -> bool:
        """True when the frame is used."""
        return self.verdict == "ok"

    def to_dict(self) -> dict:
        """JSON-friendly form (the zone grid is internal and left out)."""
        out = asdict(self)
        del out["zones"]
        return out


#: Pixels sampled per frame (evenly spaced full rows). A flat's level from 262 144 pixels is
#: within ~3e-5 of the frame's (1.25 x ~1.2 % noise / 512), far below a master flat's own
#: noise; a million pixels cost 4x the reading and measuring (~1 s of a 50-flat build).
FRAME_SAMPLE_PIXELS = 262_144

#: Stored types whose values are integers from 0 to the given count - 1 (the bins their
#: medians are counted in, `measure`).
COUNTED = {"uint16": 1 << 16, "uint8": 1 << 8}

#: Samples at least this large measure shape and noise on a quarter of their pixels (a
#: larger `sample_rows` sample, as `stacker inspect` takes).
QC_SUBSAMPLE_FROM = 1_000_000


def full_scale(frame: Frame) -> float | None:
    """The largest value the frame's data type can hold (None for float data)."""
    return {"uint16": 65535.0, "uint8": 255.0, "int16": 32767.0}.get(frame.dtype)


def clipped_stats(values: np.ndarray, sigma: float = 5.0, iterations: int = 2,
                  median: float | None = None, mad: float | None = None
                  ) -> tuple[float, float]:
    """Mean and standard deviation of finite `values` after clipping at `sigma` around them.

    The first window is the median +- `sigma` x 1.4826 MAD (robust to hot pixels and cosmic
    rays); the answer is continuous even for integer data, whose MAD jumps in whole steps.
    `median`, when the caller has it, saves computing it again, and so does `mad`, the
    median absolute deviation of `values` from `median`.
    """
    from stacker.compiled import deviation_median, window_moments

    if values.size == 0:
        return float("nan"), float("nan")
    # Compiled passes (`window_moments`): numpy's masks, copies and float32 reductions took
    # 5.6 ms of the ~7 ms measuring a dark frame's 262 144 sampled pixels.
    values = np.ascontiguousarray(values).ravel()
    if values.dtype not in (np.float32, np.float64):
        values = values.astype(np.float64)
    kind = values.dtype.type
    centre = _median(values) if median is None else median
    if mad is None:
        mad = deviation_median(values, kind(centre), np.empty_like(values)) \
            if values.dtype == np.float32 else float(np.median(np.abs(values - centre)))
    spread = MAD_TO_SIGMA * mad
    if spread == 0:
        spread = float(values.std())
    for _ in range(iterations):
        n, mean, std = window_moments(values, kind(centre), kind(sigma * spread))
        if n == 0:
            return centre, 0.0
        centre, spread = float(mean), float(std)
        if spread == 0:
            break
    return centre, spread


def measure(frame: Frame, values: np.ndarray, raw: np.ndarray | None = None,
            quality: bool = True) -> FrameStats:
    """Statistics of one frame's sample; `raw` (before subtraction) decides saturation.

    Without `quality` (quality control off) the clipped level, noise and a flat's zone grid,
    which only quality control judges, are not computed (NaN, empty): half the cost of
    measuring a flat, whose median is all a run without quality control needs.
    """
    from stacker.compiled import sample_pass

    values = np.asarray(values, np.float32)
    flat_values = np.ascontiguousarray(values).ravel()
    flat_raw = flat_values if raw is None or raw is values else \
        np.ascontiguousarray(raw, np.float32).ravel()
    top = full_scale(frame)
    # One compiled pass instead of numpy's isfinite, boolean copy, saturation test and four
    # reductions (with the median's copy, 6.5 of the 10.8 ms a 4096 px frame's 1 M sampled
    # pixels took).
    finite, work = np.empty((2, flat_values.size), np.float32)
    # A flat's full-scale fraction is the median of its raw values where the corrected
    # ones are finite: gathered in the same pass.
    raw_work = np.empty(flat_values.size if flat_raw is not flat_values and top is not None
                        else 0, np.float32)
    n, mean, std, lo, hi, n_top = sample_pass(flat_values, flat_raw,
                                              np.inf if top is None else top, finite, work,
                                              raw_work)
    saturated = n_top / flat_values.size if top is not None else 0.0
    if n == 0:
        nan = float("nan")
        return FrameStats(str(frame.path), nan, nan, nan, nan, nan, 0.0, saturated)
    finite = finite[:n]
    # The level (median, which scales flats) uses every sampled pixel; the QC-only shape and
    # noise use a quarter of them, plenty for a z-score and four times cheaper.
    step = 2 if n >= QC_SUBSAMPLE_FROM else 1
    # Camera values as read (nothing subtracted) are integers: their medians are counted.
    median, mad = _medians(finite, work[:n], frame.dtype if flat_raw is flat_values else None)
    mad = mad if step == 1 else None
    fraction = None
    if top is not None and flat_raw is flat_values:
        fraction = median / top
    elif top is not None:
        # A flat's raw values (before the dark is subtracted) are camera integers too.
        fraction = _medians(raw_work[:n], raw_work[:n], frame.dtype)[0] / top
    zones = _zones(values[::step, ::step], median) \
        if quality and frame.kind == "flat" and median > 0 else ()
    level, noise = clipped_stats(finite[::step * step], median=median, mad=mad) if quality \
        else (float("nan"), float("nan"))
    return FrameStats(str(frame.path), median, float(mean), float(std), float(lo), float(hi),
                      n / flat_values.size, saturated, level=level, noise=noise,
                      full_scale_fraction=fraction, zones=zones)


def _medians(values: np.ndarray, work: np.ndarray, dtype: str | None
             ) -> tuple[float, float | None]:
    """(median, median absolute deviation from it) of finite float32 `values`, the latter
    None when not counted. Values of a `COUNTED` stored `dtype` are counted in bins (when
    they all are integers in range); else `work`, a copy of them, is reordered by a
    quickselect."""
    from stacker.compiled import count_values, counted_medians, median_in_place

    counts = COUNTED.get(dtype) if dtype is not None else None
    if counts is not None:
        hist = np.zeros(counts, np.int64)
        if count_values(values, hist):
            median, mad = counted_medians(hist, values.size)
            return float(median), float(mad)
    return float(median_in_place(work)), None


def _median(values: np.ndarray) -> float:
    """``float(np.median(values))`` of finite values; float32 ones by a compiled quickselect
    (a flat's level is two medians of each frame's sample, and every frame's noise the median
    of its deviations: numpy's partition took half of measuring a dark frame, because its
    deviations are few distinct values)."""
    if values.dtype != np.float32 or values.size == 0:
        return float(np.median(values))
    from stacker.compiled import median_in_place

    return float(median_in_place(np.array(values, dtype=np.float32).ravel()))


def _zones(values: np.ndarray, level: float) -> tuple[float, ...]:
    """Median of each zone of a coarse grid, relative to the frame's level."""
    out = []
    for band in np.array_split(values, min(SHAPE_ZONES, values.shape[0]), axis=0):
        for zone in np.array_split(band, min(SHAPE_ZONES, values.shape[1]), axis=1):
            # nanmedian costs several times median: only when the zone has a NaN.
            nan = np.isnan(zone)
            z = np.median(zone) if not nan.any() else \
                np.nanmedian(zone) if not nan.all() else np.nan
            out.append(float(z) / level)
    return tuple(out)


def verdict(frame: Frame, stats: FrameStats, settings: Settings | None = None) -> str | None:
    """Why a frame's data range makes it unusable, or None when it is fine."""
    from stacker.config import Settings

    s = settings or Settings()
    if stats.finite_fraction < s.qc_min_finite_fraction:
        return (f"only {stats.finite_fraction:.0%} of its pixels are finite numbers (NaN/inf; "
                f"qc_min_finite_fraction is {s.qc_min_finite_fraction:g})")
    if stats.std == 0:
        if stats.min == 0:
            return "all-zero frame; a blank or failed download"
        return f"constant frame (every sampled pixel is {stats.min:g}); a dead or blank file"
    if frame.kind != "flat":
        return None
    if stats.full_scale_fraction is not None and stats.full_scale_fraction > s.qc_flat_max_level:
        return (f"flat level at {stats.full_scale_fraction:.0%} of full scale, above "
                f"qc_flat_max_level {s.qc_flat_max_level:.0%} (non-linear); shorten the exposure")
    if stats.saturated_fraction > s.qc_saturated_fraction:
        return (f"saturated: {stats.saturated_fraction:.1%} of its pixels at full scale; "
                "shorten the flat exposure")
    return None


def unreadable(frame: Frame, reason: str) -> FrameStats:
    """The statistics of a frame whose pixels could not be read: NaN, with the reason."""
    nan = float("nan")
    return FrameStats(str(frame.path), nan, nan, nan, nan, nan, 0.0, 0.0, verdict=reason)


def header_verdict(frame: Frame, job: Job, settings: Settings,
                   temperature: float | None) -> str | None:
    """Why a frame's header disagrees with its group, or None.

    `temperature` is the group's median CCD-TEMP; it is compared for bias and darks only
    (a flat's few seconds of dark current do not depend on it measurably).
    """
    if job.kind != "bias" and frame.exptime is not None and job.exptime is not None \
            and not settings.exposures_match(frame.exptime, job.exptime):
        return f"exposure {frame.exptime:g} s differs from its group's {job.exptime:g} s"
    for name, mine, theirs in (("GAIN", frame.gain, job.gain), ("OFFSET", frame.offset, job.offset),
                               ("binning", frame.binning, job.binning)):
        if mine != theirs:
            return f"{name} {mine} differs from its group's {theirs}"
    if job.kind in ("bias", "dark") and temperature is not None and frame.ccd_temp is not None \
            and not settings.temperatures_match(frame.ccd_temp, temperature):
        return (f"CCD-TEMP {frame.ccd_temp:g} C is {abs(frame.ccd_temp - temperature):.1f} C from "
                f"its group's median {temperature:g} C (temperature_tolerance "
                f"{settings.temperature_tolerance:g})")
    return None


def judge(job: Job, measured: Sequence[FrameStats], settings: Settings) -> list[FrameStats]:
    """Every frame's statistics with its verdict (``"ok"`` or the reason it is left out).

    Without ``quality_control`` only a flat with no signal is left out (it cannot be scaled).
    """
    temps = [f.ccd_temp for f in job.frames if f.ccd_temp is not None]
    temperature = statistics.median(temps) if temps else None
    out = []
    for frame, st in zip(job.frames, measured, strict=True):
        why = st.verdict if st.verdict != "ok" else None  # unreadable: left out regardless
        if why is None and settings.quality_control:
            why = verdict(frame, st, settings) or header_verdict(frame, job, settings,
                                                                 temperature)
        if why is None and job.kind == "flat" and not st.median > 0:
            why = f"flat level {st.median:g} <= 0 after subtracting the master; is it exposed?"
        out.append(replace(st, verdict=why or "ok"))
    if settings.quality_control and settings.qc_outlier_sigma is not None:
        out = outliers(job.kind, out, settings.qc_outlier_sigma)
    return out


def _robust_z(values: Sequence[float], floor: float) -> list[float]:
    x = np.asarray(values, dtype=np.float64)
    centre = float(np.median(x))
    spread = max(MAD_TO_SIGMA * float(np.median(np.abs(x - centre))), floor)
    return [float(v) for v in (x - centre) / spread]


def outliers(kind: str, stats: list[FrameStats], threshold: float) -> list[FrameStats]:
    """Mark frames whose level or noise (bias, darks) or shape (flats) departs from the group.

    Only frames still ``ok`` take part; with fewer than 3 of them nothing is judged.
    """
    idx = [i for i, s in enumerate(stats) if s.ok]
    if len(idx) < 3:
        return stats
    out = list(stats)
    noise = float(np.median([stats[i].noise for i in idx]))
    if kind == "flat":
        dev = _shape_departures([stats[i].zones for i in idx])
        for i, z in zip(idx, _robust_z(dev, SHAPE_FLOOR), strict=True):
            why = None
            if z > threshold:
                why = (f"outlier: its shape departs {dev[idx.index(i)]:.2%} rms from the "
                       f"group's flat pattern, z-score {z:.1f} > {threshold:g} "
                       "(a cloud, a gradient or a moving light?)")
            out[i] = replace(out[i], z_shape=round(z, 3), verdict=why or "ok")
        return out
    z_level = _robust_z([stats[i].level for i in idx], LEVEL_FLOOR_NOISE * noise)
    z_noise = _robust_z([stats[i].noise for i in idx], NOISE_FLOOR_NOISE * noise)
    level = float(np.median([stats[i].level for i in idx]))
    for i, zl, zn in zip(idx, z_level, z_noise, strict=True):
        st = stats[i]
        why = None
        if abs(zl) > threshold:
            why = (f"outlier: level {st.level:.6g} ADU vs the group's {level:.6g}, z-score "
                   f"{zl:.1f} (|z| > {threshold:g}; a light leak or a wrong frame?)")
        elif abs(zn) > threshold:
            why = (f"outlier: noise {st.noise:.4g} ADU vs the group's {noise:.4g}, z-score "
                   f"{zn:.1f} (|z| > {threshold:g})")
        out[i] = replace(st, z_level=round(zl, 3), z_noise=round(zn, 3), verdict=why or "ok")
    return out


def _shape_departures(zones: list[tuple[float, ...]]) -> list[float]:
    """RMS departure of each frame's normalized zone grid from the group's median grid."""
    grid = np.asarray(zones, dtype=np.float64)
    reference = np.median(grid, axis=0)
    return [float(v) for v in np.sqrt(np.mean((grid / reference - 1) ** 2, axis=1))]


def sample_frames(frames: Sequence[Frame], rows: Sequence[int],
                  subtract: np.ndarray | None = None, workers: int = 1,
                  quality: bool = True) -> list[FrameStats]:
    """Measure every frame on the same sampled `rows`, `workers` frames in memory at a time
    (`measure`, with or without the `quality` control statistics).

    A frame whose pixels cannot be read or decoded gets NaN statistics and the reason as its
    verdict, so that it is left out instead of failing the whole group later. numpy's
    medians and reductions release the GIL, so frames are measured on `workers` threads.
    """
    reader = StripReader(tuple(frames))
    # Each frame's sampled rows are ~64 small reads scattered over the file: read ahead,
    # they reach the disk together instead of one at a time per worker.
    ahead = ReadAhead([reader.row_ranges(i, rows) for i in range(len(frames))],
                      4 * max(1, workers))

    def one(i: int) -> FrameStats:
        ahead.started()
        try:
            raw = reader.read_frame_rows(i, rows)
        except FrameReadError as exc:
            return unreadable(frames[i], exc.reason)
        values = raw - subtract if subtract is not None else raw
        return measure(frames[i], values, raw, quality)

    with ahead:
        if workers <= 1 or len(frames) < 2:
            return [one(i) for i in range(len(frames))]
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=workers) as pool:
            return list(pool.map(one, range(len(frames))))
