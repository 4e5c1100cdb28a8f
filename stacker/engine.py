"""Runs a plan: each job in dependency order, its strips in parallel on Dask's threads.

The engine turns the memory budget into a strip height (`stacker.io.rows_per_chunk`), wires
reader, per-frame preparation, kernel and writer together for each job, fills the master's
statistics and provenance, and commits the file. A job that fails is reported and removed
from disk; the others go on.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from stacker import __version__
from stacker.combine import (
    MasterStats,
    Prepare,
    combine_into,
    normalize_in_place,
    sample_rows,
    streams,
)
from stacker.errors import BuildError, StackerError
from stacker.fitsheader import HeaderCards
from stacker.frames import Frame, read_frame
from stacker.io import (
    DIRECT_STRIP_CAP,
    READ_BYTES_PER_VALUE,
    STRIP_CAP,
    MasterWriter,
    StripReader,
    TableColumn,
    bintable_bytes,
    exceeds_page_cache,
    fits_ascii,
    image_header_bytes,
    stats_rows,
    stream_rows,
)
from stacker.io import rows_per_chunk as budget_rows
from stacker.outdir import (
    FINGERPRINT_CARD,
    Existing,
    MasterIndex,
    OutputLock,
    check_free_space,
    clean_leftovers,
    file_fingerprint,
)
from stacker.outdir import (
    fingerprint as job_fingerprint,
)
from stacker.plan import Job, Plan
from stacker.qc import FRAME_SAMPLE_PIXELS, judge, sample_frames

if TYPE_CHECKING:
    from distributed import Client

    from stacker.config import Settings

log = logging.getLogger("stacker")

#: progress(job_id, done, total) is called as strips finish.
ProgressFn = Callable[[str, int, int], None]

IMAGETYP = {"bias": "MASTER BIAS", "dark": "MASTER DARK", "flat": "MASTER FLAT"}
STAT_CARDS = {
    "DATAMEAN": "mean of the master", "DATAMED": "median of the master",
    "DATASTD": "standard deviation of the master", "DATAMIN": "minimum of the master",
    "DATAMAX": "maximum of the master", "NUSEDAVG": "mean number of frames used per pixel",
    "NUSEDMIN": "fewest frames used by a pixel", "REJFRAC": "fraction of values rejected",
}


@dataclass
class MasterResult:
    """What happened to one job: built (with its file and statistics), failed or refused."""

    job_id: str
    kind: str
    status: str  # "built" | "current" (up to date on disk, not rebuilt) | "failed" | "refused"
    path: Path | None = None
    error: str | None = None
    n_frames: int = 0
    exptime: float | None = None
    filter: str | None = None
    calibration: str | None = None
    stats: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    fingerprint: str | None = None
    #: The report's pictures of a master built in this run, drawn while it was flushed to
    #: disk (`stacker.report.master_pictures`): not in `to_dict`, they are for report.html.
    pictures: dict[str, str] | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form, used in `Status.details`."""
        out = dict(self.__dict__)
        out.pop("pictures")
        out["path"] = str(self.path) if self.path else None
        return out


def run_plan(plan: Plan, settings: Settings, *, progress: ProgressFn | None = None,
             client: Client | None = None) -> list[MasterResult]:
    """Build every buildable job of `plan` in dependency order.

    Parameters
    ----------
    plan : Plan
        From `stacker.plan.make_plan`.
    settings : Settings
        Output folder, rejection, normalization, memory budget, workers.
    progress : callable, optional
        ``progress(job_id, done, total)`` as strips finish.
    client : distributed.Client, optional
        Build on this Dask cluster (`stacker.cluster`) instead of this process's threads.
    """
    if client is None:
        check_budget(plan, settings)
    else:
        from stacker import cluster

        check_budget(plan, cluster.budget_settings(client, settings))
    out_dir = Path(settings.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with OutputLock(out_dir):
        clean_leftovers(out_dir)
        digests = _fingerprints(plan, settings)
        current = up_to_date(plan, settings, digests)
        if not settings.save_individual_masters and len(current) < len(plan.buildable()):
            current = {}  # one file holds every master: rebuild it whole or not at all
        work_dir = out_dir if settings.save_individual_masters else _work_dir(out_dir, plan)
        done = {job.id: _current_result(job, current[job.id], digests[job.id])
                for job in plan.jobs if job.id in current}
        if client is not None:
            results = cluster.run_jobs(client, plan, settings, work_dir, progress,
                                       digests=digests, done=done)
        else:
            built = {job_id: existing.path for job_id, existing in current.items()}
            results = [settled(job, done) or _run_job(job, settings, work_dir, built, progress,
                                                       digests[job.id])
                       for job in plan.jobs]
        if not settings.save_individual_masters:
            if current:
                shutil.rmtree(work_dir, ignore_errors=True)
            else:
                results = _assemble_results(results, out_dir, plan, work_dir)
    return results


def settled(job: Job, done: dict[str, MasterResult]) -> MasterResult | None:
    """The result of a job that is not to be built (refused, or up to date), else None."""
    if job.refused is not None:
        log.warning("%s not built: %s", job.id, job.refused)
        return _result(job, "refused", error=job.refused)
    return done.get(job.id)


def _current_result(job: Job, existing: Existing, digest: str) -> MasterResult:
    """The result of a job whose master is already on disk with the same fingerprint."""
    log.info("%s: up to date in %s (same inputs and settings; --force rebuilds it)", job.id,
             existing.path.name)
    return _result(job, "current", path=existing.path, fingerprint=digest,
                   stats=dict(existing.stats))


def _fingerprints(plan: Plan, settings: Settings) -> dict[str, str]:
    """Each job's fingerprint; a flat's includes that of the master it subtracts."""
    digests: dict[str, str] = {}
    for job in plan.jobs:  # dependency order: a flat's dark is digested first
        cal = job.calibration
        cal_digest = None
        if cal is not None:
            cal_digest = digests.get(cal.job_id) if cal.job_id else file_fingerprint(cal.path)
        digests[job.id] = job_fingerprint(job, settings, cal_digest)
    return digests


def up_to_date(plan: Plan, settings: Settings,
               digests: dict[str, str] | None = None) -> dict[str, Existing]:
    """Masters of `plan` already in the output folder with the same fingerprint.

    These are what `run_plan` keeps instead of building (none with ``force``). `digests`
    are the jobs' fingerprints when the caller has them.
    """
    out_dir = Path(settings.output_dir)
    if settings.force or not out_dir.is_dir():
        return {}
    digests = digests or _fingerprints(plan, settings)
    index = MasterIndex.scan(out_dir, (*STAT_CARDS, "NORMFACT"))
    found = {job.id: index.get(job.id, digests[job.id]) for job in plan.buildable()}
    return {job_id: existing for job_id, existing in found.items() if existing is not None}


def strip_rows(job: Job, settings: Settings, frames: Sequence[Frame] | None = None,
               direct: bool = False) -> int:
    """Rows per strip for `job` (or its usable `frames`) under the memory budget (raises
    MemoryBudgetError); reading `direct`ly, each worker has a second block, read ahead
    (`stacker.combine.StripBlocks`). The mean and min/max of camera data hold running sums
    instead of a block (`stacker.combine.streams`)."""
    from stacker.kernels import make_kernel

    kernel = make_kernel(settings.rejection_method, **settings.kernel_options())
    ny, nx = job.shape
    frames = tuple(job.frames if frames is None else frames)
    n = len(frames)
    w = settings.resolved_num_workers
    # Flats are corrected as they are read (float32); other frames keep their type.
    dtype = np.float32 if job.kind == "flat" else StripReader(frames).dtype
    if streams(kernel, dtype, n):
        # No block of all N frames: the budget needs a row of running sums, whatever N
        # (`combine_into`); these rows bound its read-back passes.
        return stream_rows(settings.memory_limit, job.shape, w, direct, what=job.id)
    held = READ_BYTES_PER_VALUE + kernel.bytes_per_value
    rows = budget_rows(settings.memory_limit, n, nx, w, held, height=ny, what=job.id,
                       strip_cap=DIRECT_STRIP_CAP if direct else STRIP_CAP)
    if direct:  # the second block counts against the budget, not against the strip's cap
        rows = min(rows, budget_rows(settings.memory_limit, n, nx, w,
                                     held + READ_BYTES_PER_VALUE, strip_cap=None, what=job.id))
    return rows


def check_budget(plan: Plan, settings: Settings) -> None:
    """Fail before reading any pixel when a job's row does not fit the memory budget.

    Raises
    ------
    MemoryBudgetError
        Naming the job, the budget and the bytes one row of all its frames needs.
    """
    for job in plan.buildable():
        strip_rows(job, settings)


def _work_dir(out_dir: Path, plan: Plan) -> Path:
    work = out_dir / f".stacker-work-{plan.timestamp}"
    work.mkdir(exist_ok=True)
    return work


def _result(job: Job, status: str, **kw) -> MasterResult:
    return MasterResult(job.id, job.kind, status, n_frames=len(job.frames), exptime=job.exptime,
                        filter=job.filter, notes=list(job.notes),
                        calibration=job.calibration.describe() if job.calibration else None,
                        **kw)


def _run_job(job: Job, settings: Settings, work_dir: Path, built: dict[str, Path],
             progress: ProgressFn | None, digest: str | None = None) -> MasterResult:
    start = time.perf_counter()
    for note in job.notes:
        log.warning("%s: %s", job.id, note)
    try:
        calibration = _calibration_path(job, built)
        path, stats, pictures = build_master(job, settings, work_dir / job.output_name,
                                             calibration, progress=progress,
                                             fingerprint=digest)
    except StackerError as exc:
        log.error("%s failed: %s", job.id, exc)
        return _result(job, "failed", error=str(exc), seconds=time.perf_counter() - start)
    except OSError as exc:
        message = _write_error(exc, work_dir / job.output_name)
        log.error("%s failed: %s", job.id, message)
        return _result(job, "failed", error=message, seconds=time.perf_counter() - start)
    except Exception as exc:  # a bug or an input we did not foresee: fail this master only
        log.debug("%s: traceback", job.id, exc_info=True)
        log.error("%s failed: unexpected %s: %s (run with --debug for details)", job.id,
                  type(exc).__name__, exc)
        return _result(job, "failed", error=f"unexpected {type(exc).__name__}: {exc}",
                       seconds=time.perf_counter() - start)
    built[job.id] = path
    seconds = time.perf_counter() - start
    log.info("%s: %d frames -> %s (%.1f s)", job.id, len(job.frames), path.name, seconds)
    return _result(job, "built", path=path, stats=stats, seconds=seconds, fingerprint=digest,
                   pictures=pictures)


def _write_error(exc: OSError, path: Path) -> str:
    """One line for an OS error while building: a full disk says so and names the fix."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return (f"no space left on the device while writing {path} (the partial file was "
                "removed); free some space or choose another output_dir")
    if exc.errno == errno.EFBIG:
        return (f"file size limit exceeded while writing {path} (the partial file was "
                "removed); raise the limit (ulimit -f) or choose another output_dir")
    return f"I/O error: {exc}"


def _calibration_path(job: Job, built: dict[str, Path]) -> Path | None:
    cal = job.calibration
    if cal is None:
        return None
    if cal.path is not None:
        return cal.path
    if cal.job_id not in built:
        raise BuildError(f"{cal.describe()} was not built, so {job.id} cannot be calibrated")
    return built[cal.job_id]


def build_master(job: Job, settings: Settings, path: Path, calibration: Path | None = None,
                 *, progress: ProgressFn | None = None,
                 fingerprint: str | None = None
                 ) -> tuple[Path, dict[str, Any], dict[str, str] | None]:
    """Build one master into `path` (complete on disk, or absent on any error).

    `fingerprint`, when given, is recorded in the header (card STKFP) so that a rerun with
    the same inputs and settings finds the master and skips it.

    Returns
    -------
    path : Path
        The committed file.
    stats : dict
        Master statistics, per-frame statistics and verdicts, flat levels and scales.
    pictures : dict or None
        The report's pictures of the master, or None (`_sync_drawing`).
    """
    from stacker.kernels import make_kernel

    kernel = make_kernel(settings.rejection_method, **settings.kernel_options())
    cal_reader = _calibration_reader(job, calibration)
    frames, frame_stats = _validate(job, settings, cal_reader)
    reader = StripReader(frames, direct=exceeds_page_cache(sum(f.nbytes for f in frames)))
    n, ny, nx = reader.shape
    w = settings.resolved_num_workers
    rows = strip_rows(job, settings, frames, reader.direct)
    levels = scales = None
    prepare = None
    if job.kind == "flat":
        # Scale every flat to the median level so that a twilight sky brightening between
        # frames is not taken for outliers by the rejection.
        levels = [frame_stats[str(f.path)].median for f in frames]
        reference = float(np.median(levels))
        scales = [reference / lv for lv in levels]
        prepare = Prepare(calibration=cal_reader, scales=tuple(scales))
    header = master_header(job, settings, frames, calibration)
    if fingerprint is not None:
        header[FINGERPRINT_CARD] = (fingerprint, "inputs+settings digest")
    check_free_space(path.parent, ny * nx * 6 + len(frames) * 400, job.id)
    writer = MasterWriter.create(path, (ny, nx), header, _count_header(),
                                 _inputs_table(frames, levels, scales))
    try:
        log.debug("%s: %d frames of %dx%d in strips of %d rows on %d workers%s", job.id, n,
                  nx, ny, rows, w, ", around the page cache" if reader.direct else "")
        stats = combine_into(reader, writer, kernel, rows, prepare=prepare, num_workers=w,
                             progress=_job_progress(job.id, progress))
        back = stats_rows(settings.memory_limit, nx)
        cards = _stat_cards(stats, n)
        if job.kind == "flat":
            factor = _norm_factor(stats, settings.normalization_method, job)
            normalize_in_place(writer, factor, back, w)
            stats = stats.scaled(factor)
            cards = {**_stat_cards(stats, n), "NORMFACT": factor}
        writer.set_cards(cards)
        pictures = _sync_drawing(writer, job, n)
        final = writer.commit()
    except BaseException:
        writer.abort()
        raise
    out = _stats_dict(stats, n, levels, scales)
    out["frames"] = [s.to_dict() for s in frame_stats.values()]
    out["rows_per_strip"] = rows
    out["read_around_page_cache"] = reader.direct
    return final, out, pictures


def _sync_drawing(writer: MasterWriter, job: Job, n: int) -> dict[str, str] | None:
    """Flush the finished master to disk while its report pictures are drawn from it
    (`stacker.report.master_pictures`), before it is renamed into place: the CPU is idle
    while the disk flushes (~35-50 ms for 96 MB here), and the pictures took ~70-100 ms
    after the run, reading the master again. None when they could not be drawn: they never
    fail a master, and the report reads the master for them."""
    from concurrent.futures import ThreadPoolExecutor

    from stacker.report import master_pictures

    with ThreadPoolExecutor(1, thread_name_prefix="stacker-pictures") as pool:
        drawing = pool.submit(master_pictures, str(writer.temp_path), job.id, n)
        writer.sync()
        try:
            return drawing.result()
        except Exception as exc:
            log.debug("%s: pictures not drawn (%s: %s); the report reads the master",
                      job.id, type(exc).__name__, exc, exc_info=True)
            return None


def _calibration_reader(job: Job, calibration: Path | None) -> StripReader | None:
    if job.kind != "flat":
        return None
    cal_frame = read_frame(calibration)
    if cal_frame.shape != job.shape:
        raise BuildError(f"{calibration} is {cal_frame.shape[1]}x{cal_frame.shape[0]}, the flats "
                         f"of {job.id} are {job.shape[1]}x{job.shape[0]}")
    return StripReader((cal_frame,))


def _validate(job: Job, settings: Settings, cal_reader: StripReader | None):
    """Measure every frame on sampled rows; with quality_control, leave out bad ones.

    Flats are always measured (their levels scale them); bias and darks only for quality
    control, which costs reading ~262 000 pixels per frame.
    """
    if not settings.quality_control and job.kind != "flat":
        return job.frames, {}
    ny, nx = job.shape
    rows = sample_rows(ny, nx, FRAME_SAMPLE_PIXELS)
    subtract = cal_reader.read_frame_rows(0, rows) if cal_reader is not None else None
    measured = judge(job, sample_frames(job.frames, rows, subtract,
                                        workers=settings.resolved_num_workers,
                                        quality=settings.quality_control), settings)
    kept, stats = [], {}
    for frame, st in zip(job.frames, measured, strict=True):
        if st.ok:
            kept.append(frame)
        else:
            log.warning("%s: left out %s: %s", job.id, frame.path, st.verdict)
        stats[str(frame.path)] = st
    if len(kept) < max(settings.min_frames, 1):
        out = [st for st in measured if not st.ok]
        why = f" ({len(out)} left out; first: {Path(out[0].path).name}: {out[0].verdict})" \
            if out else ""
        raise BuildError(f"{job.id}: {len(kept)} usable frames after quality control{why}, "
                         f"min_frames is {settings.min_frames}")
    return tuple(kept), stats


def _norm_factor(stats: MasterStats, method: str, job: Job) -> float:
    factor = {"mean": stats.mean, "median": stats.median, "max": stats.max}[method]
    if not np.isfinite(factor) or factor <= 0:
        raise BuildError(f"{job.id}: cannot normalize by its {method} ({factor}); the combined "
                         "flat has no positive signal")
    return float(factor)


def _stat_cards(stats: MasterStats, n: int) -> dict[str, float]:
    return {"DATAMEAN": stats.mean, "DATAMED": stats.median, "DATASTD": stats.std,
            "DATAMIN": stats.min, "DATAMAX": stats.max, "NUSEDAVG": stats.used_mean,
            "NUSEDMIN": stats.used_min, "REJFRAC": 1.0 - stats.used_mean / n}


def _stats_dict(stats: MasterStats, n: int, levels, scales) -> dict[str, Any]:
    out: dict[str, Any] = {k.lower(): v for k, v in _stat_cards(stats, n).items()}
    out["nused_max"] = stats.used_max
    out["n_nan"] = stats.n_nan
    if levels is not None:
        out["frame_levels"] = [float(v) for v in levels]
        out["frame_scales"] = [float(v) for v in scales]
    return out


def _job_progress(job_id: str, progress: ProgressFn | None):
    """`combine_into`'s ``progress(done, total)`` reporting for one job, or None."""
    if progress is None:
        return None
    return lambda done, total: progress(job_id, done, total)


# --------------------------------------------------------------------------------------------
# Headers and provenance


def master_header(job: Job, settings: Settings, frames: tuple[Frame, ...],
                  calibration: Path | None) -> HeaderCards:
    """The provenance header of a master: what it is, how it was made, from what."""
    h = HeaderCards()
    h["IMAGETYP"] = (IMAGETYP[job.kind], "type of image")
    if job.exptime is not None:
        h["EXPTIME"] = (round(job.exptime, 6), "[s] exposure time of the inputs")
    h["NCOMBINE"] = (len(frames), "number of frames combined")
    for key, value, comment in _method_cards(settings, job):
        h[key] = (value, comment)
    if calibration is not None:
        h["CALSUB"] = (calibration.name, "subtracted master")
        h["FLATSCAL"] = ("median", "flats scaled to their median level before rejection")
    for key, attr, comment in (("CCD-TEMP", "ccd_temp", "[C] mean sensor temperature"),
                               ("GAIN", "gain", "camera gain setting"),
                               ("OFFSET", "offset", "camera offset setting")):
        value = getattr(job, attr)
        if value is not None:
            h[key] = (round(value, 3), comment)
    h["XBINNING"], h["YBINNING"] = job.binning
    if job.filter:
        h["FILTER"] = (job.filter, "filter")
    h["BUNIT"] = ("relative" if job.kind == "flat" else "ADU", "unit of the master")
    h["DATE"] = (datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S"), "creation (UTC)")
    dates = sorted(f.date_obs for f in frames if f.date_obs)
    if dates:
        h["DATE-BEG"] = (dates[0], "first input DATE-OBS")
        h["DATE-END"] = (dates[-1], "last input DATE-OBS")
    h["CREATOR"] = (f"stacker {__version__}", "software that made this master")
    h["MASTERID"] = (job.id, "stacker job id")
    for key, comment in STAT_CARDS.items():
        h[key] = (0.0, comment)  # reserved; filled in place once the image is complete
    if job.kind == "flat":
        h["NORMFACT"] = (1.0, f"divisor: {settings.normalization_method} of the combined flat")
    # Header text is ASCII: a non-ASCII path is written percent-encoded (see fits_ascii).
    for frame in frames:
        h.add_history(f"input: {fits_ascii(str(frame.path))}")
    for frame in sorted(set(job.frames) - set(frames), key=lambda f: str(f.path)):
        h.add_history(f"rejected by quality control: {fits_ascii(str(frame.path))}")
    return h


def _method_cards(settings: Settings, job: Job) -> list[tuple[str, Any, str]]:
    opts = settings.kernel_options()
    cards: list[tuple[str, Any, str]] = [
        ("COMBMETH", settings.rejection_method, "rejection / combination method")]
    if settings.rejection_method == "sigma_clip":
        iters = opts.get("max_iterations")
        cards += [("SIGLOW", opts["sigma_low"], "low rejection threshold [sigma]"),
                  ("SIGHIGH", opts["sigma_high"], "high rejection threshold [sigma]"),
                  ("SIGCENT", opts["center"], "centre estimator"),
                  ("SIGSTDEV", opts["stddev"], "spread estimator"),
                  ("SIGITER", iters if iters is not None else "converge", "max iterations")]
    elif settings.rejection_method == "minmax":
        cards += [("NLOW", opts["nlow"], "lowest values dropped per pixel"),
                  ("NHIGH", opts["nhigh"], "highest values dropped per pixel")]
    if job.kind == "flat":
        cards.append(("NORMMETH", settings.normalization_method, "flat normalization"))
    return cards


def _count_header() -> HeaderCards:
    h = HeaderCards()
    h["EXTNAME"] = ("NUSED", "frames used per pixel after rejection")
    return h


def _inputs_table(frames: tuple[Frame, ...], levels: list[float] | None,
                  scales: list[float] | None) -> bytes:
    """The INPUTS binary table of a master, serialized: one row per combined frame.

    Columns PATH, EXPTIME, CCD_TEMP, DATE_OBS (NaN / empty when a header lacks the value)
    and, for flats, LEVEL and SCALE. Paths go through `fits_ascii`: an 'A' column holds
    ASCII only, so a non-ASCII file name is stored percent-encoded rather than failing
    the master (astropy would raise UnicodeEncodeError, naming no file).
    """
    paths = [fits_ascii(str(f.path)) for f in frames]
    cols = [TableColumn("PATH", f"{max([1, *map(len, paths)])}A", paths),
            TableColumn("EXPTIME", "D", [_nan(f.exptime) for f in frames]),
            TableColumn("CCD_TEMP", "D", [_nan(f.ccd_temp) for f in frames]),
            TableColumn("DATE_OBS", "32A", [fits_ascii(f.date_obs or "") for f in frames])]
    if levels is not None:
        cols += [TableColumn("LEVEL", "D", levels), TableColumn("SCALE", "D", scales)]
    return bintable_bytes(cols, "INPUTS")


def _nan(v: float | None) -> float:
    return float("nan") if v is None else float(v)


# --------------------------------------------------------------------------------------------
# save_individual_masters: false -> one multi-extension file


def _assemble_results(results: list[MasterResult], out_dir: Path, plan: Plan,
                      work_dir: Path) -> list[MasterResult]:
    built = [r for r in results if r.status == "built"]
    try:
        if built:
            path = assemble(built, out_dir / f"master_frames_{plan.timestamp}.fits")
            for r in built:
                r.path = path
    finally:
        # Individual masters were only a step: nothing of them stays beside the one file.
        for leftover in work_dir.glob("*"):
            leftover.unlink()
        work_dir.rmdir()
    return results


def assemble(results: list[MasterResult], path: Path) -> Path:
    """Copy built masters into one multi-extension FITS file (one named HDU per master).

    Each master contributes its image HDU (EXTNAME = job id) and its frames-used HDU
    (``<job id>_NUSED``); pixel bytes are copied as they are, never loaded whole.
    """
    temp = path.with_name(f".{path.name}.part")
    primary = HeaderCards()
    primary["NMASTERS"] = (len(results), "masters in this file")
    primary["CREATOR"] = f"stacker {__version__}"
    try:
        with open(temp, "wb") as out:
            out.write(image_header_bytes(primary, (), bitpix=8, primary=True))
            # A flat names the dark it subtracted by file; in this file that is an HDU.
            names = {r.path.name: r.job_id.upper() for r in results}
            for r in results:
                _copy_master(r.path, r.job_id, out, names)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    return path


def _copy_master(src: Path, name: str, out, names: dict[str, str]) -> None:
    from astropy.io import fits

    with fits.open(src, memmap=False, lazy_load_hdus=True) as hdul, open(src, "rb") as fh:
        for index, extname in ((0, name.upper()), (1, f"{name.upper()}_NUSED")):
            hdu = hdul[index]
            header = hdu.header.copy()
            header["EXTNAME"] = extname
            if header.get("CALSUB") in names:
                header["CALSUB"] = (names[header["CALSUB"]], "HDU of the subtracted master")
            shape = (header["NAXIS2"], header["NAXIS1"])
            out.write(image_header_bytes(header, shape, bitpix=header["BITPIX"], primary=False))
            info = hdu.fileinfo()
            fh.seek(info["datLoc"])
            remaining = info["datSpan"]
            while remaining:
                chunk = fh.read(min(remaining, 16 << 20))
                out.write(chunk)
                remaining -= len(chunk)


def existing_masters(out_dir: Path) -> list[Frame]:
    """Master darks and biases already in `out_dir`, for flats built on their own."""
    found = []
    for path in sorted(out_dir.glob("master_*.fits")):
        if not path.name.startswith(("master_dark_", "master_bias_")):
            continue
        try:
            frame = read_frame(path, kind=None)
        except (ValueError, OSError) as exc:
            log.warning("ignoring %s: %s", path, exc)
            continue
        found.append(frame)
    return found
