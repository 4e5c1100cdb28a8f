"""The planner: frames grouped into jobs with explicit dependencies. Nothing runs here.

One master bias per (binning, gain, offset); one master dark per exposure (equal within a
tolerance), binning, gain, offset and temperature; one master flat per filter, exposure,
binning, gain and offset. A flat job names the master it subtracts: the dark of its exposure,
else the bias (said in its notes), else it is refused with the reason.
"""

from __future__ import annotations

import statistics
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from stacker.frames import Frame

if TYPE_CHECKING:
    from stacker.config import Settings

KIND_ORDER = {"bias": 0, "dark": 1, "flat": 2}


@dataclass(frozen=True)
class Calibration:
    """The master a flat job subtracts: a job of this plan or a master file already on disk."""

    kind: str  # "dark" or "bias"
    job_id: str | None = None
    path: Path | None = None

    def describe(self) -> str:
        """Human-readable origin, for the plan table, the log and the FITS header."""
        where = f"job {self.job_id}" if self.job_id else f"existing {self.path}"
        return f"master {self.kind} ({where})"


@dataclass(frozen=True)
class Job:
    """One master to build.

    Attributes
    ----------
    id : str
        Unique name such as ``dark_5.000s`` (also the EXTNAME in a multi-extension file).
    kind : str
        ``bias``, ``dark`` or ``flat``.
    frames : tuple of Frame
        The inputs, in path order.
    output_name : str
        File name of the master (seed naming, one timestamp per run).
    calibration : Calibration or None
        For flats: the master subtracted from every frame.
    refused : str or None
        Why this job cannot be built (too few frames, no dark or bias); None when buildable.
    """

    id: str
    kind: str
    frames: tuple[Frame, ...]
    exptime: float | None
    filter: str | None
    binning: tuple[int, int]
    gain: float | None
    offset: float | None
    ccd_temp: float | None
    output_name: str
    calibration: Calibration | None = None
    refused: str | None = None
    notes: tuple[str, ...] = ()

    @property
    def depends_on(self) -> tuple[str, ...]:
        """Ids of jobs that must finish before this one."""
        if self.calibration is not None and self.calibration.job_id is not None:
            return (self.calibration.job_id,)
        return ()

    @property
    def shape(self) -> tuple[int, int]:
        """``(ny, nx)`` of every input frame."""
        return self.frames[0].shape


@dataclass
class Plan:
    """Jobs in dependency order, plus frames left out while grouping."""

    jobs: list[Job]
    timestamp: str
    left_out: list[tuple[Path, str]] = field(default_factory=list)

    def buildable(self) -> list[Job]:
        """Jobs that will run, in dependency order."""
        return [j for j in self.jobs if j.refused is None]

    def describe(self, current: dict[str, Path] | None = None) -> str:
        """A text table of the plan: groups, frame counts, dependencies, output names.

        `current` maps job ids to masters already up to date on disk (they are kept).
        """
        current = current or {}
        rows = [("job", "frames", "exposure", "depends on", "output")]
        for j in self.jobs:
            exp = f"{j.exptime:.3f}s" if j.exptime is not None else "-"
            dep = j.calibration.describe() if j.calibration else "-"
            out = j.output_name if j.refused is None else f"NOT BUILT: {j.refused}"
            if j.id in current:
                out = f"up to date: {current[j.id].name}"
            rows.append((j.id, str(len(j.frames)), exp, dep, out))
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r[:4], widths, strict=True)) + "  " + r[4]
                 for r in rows]
        for j in self.jobs:
            lines.extend(f"note: {j.id}: {n}" for n in j.notes)
        lines.extend(f"left out: {p}: {why}" for p, why in self.left_out)
        return "\n".join(lines)


def cluster(values: Sequence[float], close: Callable[[float, float], bool]) -> list[list[int]]:
    """Indices of `values` grouped by single linkage: sorted neighbours that are `close`."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    groups: list[list[int]] = []
    for i in order:
        if groups and close(values[groups[-1][-1]], values[i]):
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def _split(frames: list[Frame], value: Callable[[Frame], float | None],
           close: Callable[[float, float], bool]) -> list[list[Frame]]:
    known = [f for f in frames if value(f) is not None]
    unknown = [f for f in frames if value(f) is None]
    groups = [[known[i] for i in g] for g in cluster([value(f) for f in known], close)]
    return groups + ([unknown] if unknown else [])


def _by(frames: Iterable[Frame], key: Callable[[Frame], object]) -> list[list[Frame]]:
    buckets: dict[object, list[Frame]] = defaultdict(list)
    for f in frames:
        buckets[key(f)].append(f)
    return [buckets[k] for k in sorted(buckets, key=repr)]


def group_frames(frames: list[Frame], settings: Settings) -> list[list[Frame]]:
    """Groups of frames that make one master each (see the module docstring for the keys)."""
    if not frames:
        return []
    kind = frames[0].kind
    groups = _by(frames, lambda f: (f.binning, f.gain, f.offset, f.filter if kind == "flat"
                                    else None))
    if kind in ("dark", "flat"):
        groups = [g for grp in groups
                  for g in _split(grp, lambda f: f.exptime, settings.exposures_match)]
    if kind == "dark":
        groups = [g for grp in groups
                  for g in _split(grp, lambda f: f.ccd_temp, settings.temperatures_match)]
    return groups


def _majority_shape(frames: list[Frame]) -> tuple[list[Frame], list[tuple[Path, str]]]:
    shapes = Counter(f.shape for f in frames)
    shape = shapes.most_common(1)[0][0]
    keep = [f for f in frames if f.shape == shape]
    out = [(f.path, f"shape {f.shape[1]}x{f.shape[0]} differs from its group's "
                    f"{shape[1]}x{shape[0]}") for f in frames if f.shape != shape]
    return keep, out


def _mean(values: Iterable[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.fmean(known) if known else None


def _tags(kind_jobs: list[dict]) -> None:
    """Add name tags for the attributes that differ between masters of one kind."""
    fields = (("binning", lambda b: f"bin{b[0]}x{b[1]}"), ("gain", lambda g: f"g{g:g}"),
              ("offset", lambda o: f"o{o:g}"), ("temp_key", lambda t: f"{t:+.0f}C"))
    for name, fmt in fields:
        values = {repr(j[name]) for j in kind_jobs}
        if len(values) > 1:
            for j in kind_jobs:
                if j[name] is not None:
                    j["tags"].append(fmt(j[name]))


def _safe(text: str) -> str:
    """A header value made safe for a file name."""
    return "".join(c if c.isalnum() or c in "-+." else "-" for c in text).strip("-.") or "x"


def _output_name(kind: str, exptime: float | None, filt: str | None, tags: list[str],
                 timestamp: str) -> str:
    parts = [f"master_{kind}"]
    if kind == "flat" and filt:
        parts.append(_safe(filt))
    if kind in ("dark", "flat"):
        parts.append(f"{exptime:.3f}s")
    parts.extend(tags)  # made by _tags from numbers: safe already
    return "_".join([*parts, timestamp]) + ".fits"


def _job_specs(inventory_frames: list[Frame], settings: Settings,
               left_out: list[tuple[Path, str]]) -> list[dict]:
    specs: list[dict] = []
    for kind in ("bias", "dark", "flat"):
        kind_specs = []
        for group in group_frames([f for f in inventory_frames if f.kind == kind], settings):
            frames, out = _majority_shape(group)
            left_out.extend(out)
            exptimes = [f.exptime for f in frames if f.exptime is not None]
            temp = _mean(f.ccd_temp for f in frames)
            kind_specs.append({
                "kind": kind, "frames": tuple(sorted(frames, key=lambda f: str(f.path))),
                "exptime": statistics.median(exptimes) if exptimes else None,
                "filter": frames[0].filter if kind == "flat" else None,
                "binning": frames[0].binning, "gain": frames[0].gain,
                "offset": frames[0].offset, "ccd_temp": temp,
                "temp_key": round(temp) if temp is not None and kind == "dark" else None,
                "tags": [],
            })
        _tags(kind_specs)
        specs.extend(kind_specs)
    return specs


def _job_id(spec: dict) -> str:
    parts = [spec["kind"]]
    if spec["kind"] == "flat" and spec["filter"]:
        parts.append(_safe(spec["filter"]))
    if spec["exptime"] is not None and spec["kind"] != "bias":
        parts.append(f"{spec['exptime']:.3f}s")
    parts.extend(spec["tags"])
    return "_".join(parts)


def make_plan(
    frames: list[Frame],
    settings: Settings,
    timestamp: str,
    *,
    kinds: Iterable[str] = ("bias", "dark", "flat"),
    existing: Sequence[Frame] = (),
) -> Plan:
    """Group `frames` into jobs for the requested `kinds`, in dependency order.

    Parameters
    ----------
    frames : list of Frame
        The inventory (all kinds: darks not asked for may still be built for a flat).
    settings : Settings
        Tolerances, `min_frames` and the output naming.
    timestamp : str
        ``YYYYMMDD_HHMMSS``, one per run, in every output name.
    kinds : iterable of str
        The masters asked for.
    existing : sequence of Frame
        Masters already in the output folder (``kind`` dark or bias), reused by flats when
        their own kind is not being built in this run.
    """
    kinds = set(kinds)
    left_out: list[tuple[Path, str]] = []
    specs = _job_specs(frames, settings, left_out)
    jobs = {}
    for spec in specs:
        refused = None
        n = len(spec["frames"])
        if n < settings.min_frames:
            refused = (f"{n} usable frame{'s' if n != 1 else ''}, min_frames is "
                       f"{settings.min_frames} (20-40 are advised)")
        job = Job(id=_job_id(spec), kind=spec["kind"], frames=spec["frames"],
                  exptime=spec["exptime"], filter=spec["filter"], binning=spec["binning"],
                  gain=spec["gain"], offset=spec["offset"], ccd_temp=spec["ccd_temp"],
                  output_name=_output_name(spec["kind"], spec["exptime"], spec["filter"],
                                           spec["tags"], timestamp),
                  refused=refused)
        jobs[job.id] = job
    wanted = {jid for jid, j in jobs.items() if j.kind in kinds}
    for jid in [j for j in jobs if jobs[j].kind == "flat" and j in wanted]:
        jobs[jid] = _attach_calibration(jobs[jid], jobs, wanted, existing, settings)
    ordered = sorted((jobs[j] for j in wanted),
                     key=lambda j: (KIND_ORDER[j.kind], j.exptime or 0.0, j.id))
    return Plan(jobs=ordered, timestamp=timestamp, left_out=left_out)


def _matches(flat: Job, other_shape: tuple[int, int], binning: tuple[int, int]) -> bool:
    return other_shape == flat.shape and binning == flat.binning


def _score(flat: Job, gain: float | None, offset: float | None, temp: float | None) -> tuple:
    # Prefer the same gain and offset, then the nearest temperature.
    return (gain != flat.gain, offset != flat.offset,
            abs((temp or 0.0) - (flat.ccd_temp or 0.0)) if temp is not None else 1e9)


def _attach_calibration(flat: Job, jobs: dict[str, Job], wanted: set[str],
                        existing: Sequence[Frame], settings: Settings) -> Job:
    notes = list(flat.notes)
    for kind in ("dark", "bias"):
        def exp_ok(e: float | None, kind: str = kind) -> bool:
            return kind == "bias" or (e is not None and settings.exposures_match(e, flat.exptime))

        candidates = [j for j in jobs.values() if j.kind == kind and j.refused is None
                      and exp_ok(j.exptime) and _matches(flat, j.shape, j.binning)]
        candidates.sort(key=lambda j: (j.id not in wanted,
                                       *_score(flat, j.gain, j.offset, j.ccd_temp)))
        files = sorted((m for m in existing if m.kind == kind and exp_ok(m.exptime)
                        and _matches(flat, m.shape, m.binning)),
                       key=lambda m: (*_score(flat, m.gain, m.offset, m.ccd_temp), -m.mtime))
        calibration = None
        if candidates and candidates[0].id in wanted:
            calibration = Calibration(kind, job_id=candidates[0].id)
        elif files:
            calibration = Calibration(kind, path=files[0].path)
        elif candidates:
            wanted.add(candidates[0].id)
            calibration = Calibration(kind, job_id=candidates[0].id)
            notes.append(f"builds {candidates[0].id} because this flat needs it")
        if calibration is not None:
            if kind == "bias":
                notes.append(f"no master dark of {flat.exptime:.3f}s: the master bias is "
                             "subtracted instead (dark current of the flat is not removed)")
            return _replace(flat, calibration=calibration, notes=tuple(notes))
    return _replace(flat, refused=(
        f"no master dark of {flat.exptime:.3f}s and no master bias to subtract; add darks of "
        f"that exposure (darks_dir) or bias frames (bias_dir)"), notes=tuple(notes))


def _replace(job: Job, **changes) -> Job:
    from dataclasses import replace

    return replace(job, **changes)
