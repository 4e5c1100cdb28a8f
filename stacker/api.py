"""The seed's Python API: `MasterFrameCreator` and `Status`, a thin façade over the engine.

>>> from stacker import MasterFrameCreator
>>> creator = MasterFrameCreator(config="configs/master_frames.yaml")   # doctest: +SKIP
>>> result = creator.create_all_master_frames()                         # doctest: +SKIP
>>> result.success, result.data                                         # doctest: +SKIP
(True, ['master_frames/master_bias_20250729_143022.fits', ...])
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stacker.config import Settings, load_settings
from stacker.errors import StackerError

if TYPE_CHECKING:
    from distributed import Client

log = logging.getLogger("stacker")

#: Master statuses that leave a usable master on disk.
READY = ("built", "current")


@dataclass
class Status:
    """The result of an operation, as the seed describes: success or error, data, details.

    Attributes
    ----------
    success : bool
        True when every planned master was built.
    message : str
        One line for a person.
    data : Any
        On success, the list of created files; on error, ``{"error": ..., "type": ...}``
        plus the files that were created before the error, if any.
    details : dict
        Counts, exposure times, per-master statistics, skipped files and the plan.
    """

    success: bool
    message: str
    data: Any = None
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def is_success(self) -> bool:
        """Same as `success`."""
        return self.success

    @property
    def is_error(self) -> bool:
        """True when the operation failed, completely or in part."""
        return not self.success

    @property
    def level(self) -> str:
        """``"success"`` or ``"error"``."""
        return "success" if self.success else "error"

    def __bool__(self) -> bool:
        return self.success

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form."""
        return {"success": self.success, "level": self.level, "message": self.message,
                "data": self.data, "details": self.details}


class _Forward(logging.Handler):
    """Sends stacker's records to a logger the caller gave us."""

    def __init__(self, target: logging.Logger) -> None:
        super().__init__()
        self.target = target

    def emit(self, record: logging.LogRecord) -> None:
        # The file log takes DEBUG; the caller's logger keeps its own level.
        if record.levelno >= self.target.getEffectiveLevel():
            self.target.handle(record)


class MasterFrameCreator:
    """Creates master bias, darks and flats as configured.

    Parameters
    ----------
    config : str, Path, dict, Settings or None
        A YAML file with a ``master_frames:`` section, the same as a dict, or `Settings`.
    logger : logging.Logger, optional
        Receives every log record of the run (in addition to the log file).
    overrides : mapping, optional
        Settings that win over the config (the CLI's typed flags); None values are ignored.
    progress : callable, optional
        ``progress(job_id, done, total)`` while masters are built.
    client : distributed.Client, optional
        Build on this Dask cluster; it is used as given and left open. Without it, the
        ``scheduler`` setting decides (a cluster started or connected to for each call, and
        closed after it), else this machine's threads.

    Raises
    ------
    stacker.errors.ConfigError
        When the configuration is invalid (raised here, before any work).
    """

    def __init__(self, config: str | Path | Mapping | Settings | None = None,
                 logger: logging.Logger | None = None, *,
                 overrides: Mapping[str, Any] | None = None, progress=None,
                 client: Client | None = None) -> None:
        self.settings = load_settings(config, overrides)
        self.logger = logger
        self.progress = progress
        self.client = client
        self._runs: list[dict[str, Any]] = []

    # -- the seed's API ------------------------------------------------------------------

    def create_all_master_frames(self) -> Status:
        """Build every master enabled by ``create_master_bias/darks/flats``."""
        s = self.settings
        kinds = [k for k, on in (("bias", s.create_master_bias), ("dark", s.create_master_darks),
                                 ("flat", s.create_master_flats)) if on]
        return self._create(kinds, "all master frames")

    def create_master_bias(self) -> Status:
        """Build only the master bias."""
        return self._create(["bias"], "master bias")

    def create_master_darks(self) -> Status:
        """Build only the master darks (one per exposure time)."""
        return self._create(["dark"], "master darks")

    def create_master_flats(self) -> Status:
        """Build only the master flats, reusing master darks already in the output folder.

        A flat whose dark is neither in the output folder nor built in this run gets it
        built from raw darks when they are configured, else the master bias is subtracted.
        """
        return self._create(["flat"], "master flats")

    def get_status(self) -> dict[str, Any]:
        """What has been created so far by this creator, and with which settings."""
        masters = [m for run in self._runs for m in run["masters"]]
        built = [m for m in masters if m["status"] in READY]

        def paths(kind: str) -> list[str]:
            return [m["path"] for m in built if m["kind"] == kind]

        return {
            "output_dir": str(self.settings.output_dir),
            "settings": self.settings.to_dict(),
            "runs": len(self._runs),
            "last_run": self._runs[-1]["timestamp"] if self._runs else None,
            "master_bias": paths("bias"),
            "master_darks": paths("dark"),
            "master_flats": paths("flat"),
            "n_master_bias": len(paths("bias")),
            "n_master_darks": len(paths("dark")),
            "n_master_flats": len(paths("flat")),
            "exposure_times": _exposures(built),
            "statistics": {m["job_id"]: m["stats"] for m in built},
            "errors": [f"{m['job_id']}: {m['error']}" for m in masters if m["error"]]
            + [e for run in self._runs for e in run.get("errors", [])],
            "skipped_files": [s for run in self._runs for s in run["skipped_files"]],
            # Run-level quality results of the last run that built masters (report.json).
            **{key: next((run[key] for run in reversed(self._runs) if key in run), None)
               for key in ("dark_series", "bad_pixel_masks", "reports")},
        }

    # -- extras --------------------------------------------------------------------------

    def plan(self, kinds: Iterable[str] = ("bias", "dark", "flat")):
        """The plan for `kinds` without reading any pixel (what ``stacker plan`` prints)."""
        from stacker.engine import existing_masters
        from stacker.frames import scan
        from stacker.plan import make_plan

        kinds = list(kinds)
        # Darks and biases are inventoried even for flats alone: a flat may need one built.
        scan_kinds = ("bias", "dark", "flat") if "flat" in kinds else kinds
        inventory = scan(self.settings, scan_kinds)
        existing = existing_masters(Path(self.settings.output_dir)) if "flat" in kinds else []
        timestamp = datetime.now().strftime("%Y%m%d_%H%M%S")
        plan = make_plan(inventory.frames, self.settings, timestamp, kinds=kinds,
                         existing=existing)
        plan.left_out = [(s.path, s.reason) for s in inventory.skipped] + plan.left_out
        return plan

    # -- internals -----------------------------------------------------------------------

    def _create(self, kinds: list[str], what: str) -> Status:
        start = time.perf_counter()
        try:
            from stacker.outdir import writable_folder

            writable_folder(self.settings.output_dir, "output_dir")
            if self.settings.log_dir is not None:
                writable_folder(self.settings.log_dir, "log_dir")
        except StackerError as exc:
            return self._failure(exc)
        with self._logging():
            try:
                plan = self.plan(kinds)
                for path, reason in plan.left_out:
                    log.warning("left out %s: %s", path, reason)
                missing = [k for k in kinds if not any(j.kind == k for j in plan.jobs)]
                for kind in missing:
                    log.warning("no usable %s frames found; no master %s", kind, kind)
                if not plan.jobs:
                    raise _nothing_to_do(kinds)
                log.info("plan:\n%s", plan.describe())
                from stacker.engine import run_plan

                with self._scheduler() as client:
                    results = run_plan(plan, self.settings, progress=self.progress,
                                       client=client)
                # Master metrics and the bad-pixel mask are quality control's third level.
                quality = _quality(results, plan, self.settings) \
                    if self.settings.quality_control else {}
            except StackerError as exc:
                return self._failure(exc)
            status = self._status(what, plan, results, missing, time.perf_counter() - start,
                                  quality)
            pictures = {r.job_id: r.pictures for r in results if r.pictures}
            status.details["reports"] = _reports(status, plan, self.settings, pictures)
            self._runs[-1]["reports"] = status.details["reports"]
        return status

    def _failure(self, exc: StackerError) -> Status:
        """A run that stopped before building anything: one line, its exit code."""
        log.error("%s", exc)
        self._runs.append({"timestamp": None, "masters": [], "skipped_files": [],
                           "errors": [str(exc)]})
        return Status(False, str(exc), data={"error": str(exc), "type": type(exc).__name__},
                      details={"exit_code": exc.exit_code})

    def _status(self, what, plan, results, missing, seconds, quality) -> Status:
        masters = [r.to_dict() for r in results]
        skipped = [{"path": str(p), "reason": why} for p, why in plan.left_out]
        self._runs.append({"timestamp": plan.timestamp, "masters": masters,
                           "skipped_files": skipped, **quality})
        built = [m for m in masters if m["status"] in READY]
        files = sorted({m["path"] for m in built})
        failed = [m for m in masters if m["status"] not in READY]
        current = [m for m in masters if m["status"] == "current"]
        rejected = [f for m in masters for f in m["stats"].get("frames", [])
                    if f["verdict"] != "ok"]
        details = {
            "n_built": len(built) - len(current),
            "n_up_to_date": len(current),
            "n_failed": len(failed),
            "n_skipped_files": len(skipped),
            "n_rejected_frames": len(rejected),
            "timestamp": plan.timestamp,
            "output_dir": str(self.settings.output_dir),
            "n_master_bias": sum(m["kind"] == "bias" for m in built),
            "n_master_darks": sum(m["kind"] == "dark" for m in built),
            "n_master_flats": sum(m["kind"] == "flat" for m in built),
            "exposure_times": _exposures(built),
            "masters": masters,
            "skipped_files": skipped,
            "missing_kinds": missing,
            "plan": plan.describe(),
            "seconds": round(seconds, 3),
            **quality,
        }
        if failed:
            reasons = "; ".join(f"{m['job_id']}: {m['error']}" for m in failed)
            message = f"{len(built)} of {len(masters)} masters built; not built: {reasons}"
            log.error(message)
            return Status(False, message, data={"error": reasons, "files": files},
                          details=details)
        n_new = len(built) - len(current)
        message = f"{what}: {n_new} master{'s' if n_new != 1 else ''} built in " \
                  f"{seconds:.1f} s in {self.settings.output_dir}"
        if current:
            message += f" ({len(current)} already up to date)"
        log.info(message)
        return Status(True, message, data=files, details=details)

    def _logging(self):
        return _RunLogging(self.settings, self.logger)

    @contextmanager
    def _scheduler(self) -> Iterator[Client | None]:
        """The Dask client of this run: the caller's, one made for `scheduler`, or None."""
        if self.client is None and self.settings.scheduler is None:
            yield None
            return
        from stacker import cluster

        with (nullcontext(self.client) if self.client is not None
              else cluster.connect(self.settings.scheduler, self.settings)) as client:
            log.info("%s", cluster.describe(client))
            yield client


def _quality(results, plan, settings: Settings) -> dict[str, Any]:
    """Master metrics (into each result's stats), dark linearity and the bad-pixel masks."""
    from stacker.metrics import measure_run

    run = measure_run(results, plan, settings)
    return {"dark_series": run.dark_series, "bad_pixel_masks": run.bad_pixel_masks,
            "metrics_errors": run.errors}


def _reports(status: Status, plan, settings: Settings,
             pictures: dict[str, dict[str, str]]) -> dict[str, str | None]:
    """Write report.json and report.html; a report that fails never fails the run."""
    from stacker.report import write_reports

    try:
        return write_reports(status, plan, settings, pictures)
    except Exception as exc:
        log.debug("report traceback", exc_info=True)
        log.warning("report not written: %s: %s", type(exc).__name__, exc)
        return {"json": None, "html": None, "error": f"{type(exc).__name__}: {exc}"}


def _exposures(masters: list[dict]) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    for kind, name in (("dark", "darks"), ("flat", "flats")):
        out[name] = sorted({round(m["exptime"], 6) for m in masters
                            if m["kind"] == kind and m["exptime"] is not None})
    return out


def _nothing_to_do(kinds: list[str]) -> StackerError:
    from stacker.errors import InputError

    return InputError(f"No input files found for {', '.join(kinds)} masters: check the input "
                      "folders and their frames' IMAGETYP/EXPTIME")


class _RunLogging:
    """During one call: the daily log file in the output (or log) folder, and forwarding."""

    def __init__(self, settings: Settings, logger: logging.Logger | None) -> None:
        self.settings = settings
        self.logger = logger
        self.handlers: list[logging.Handler] = []

    def __enter__(self) -> _RunLogging:
        folder = Path(self.settings.log_dir or self.settings.output_dir)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"master_frames_{datetime.now():%Y%m%d}.log"
        handler = logging.FileHandler(path, encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        handler.setLevel(logging.DEBUG)
        self.handlers.append(handler)
        # Records reach the caller's logger (or the root logger, where they would have
        # propagated) at that logger's level, not at the DEBUG the file log needs.
        self.old_propagate = log.propagate
        target = self.logger if self.logger is not None else (
            logging.getLogger() if log.propagate else None)
        if target is not None and target is not log:
            self.handlers.append(_Forward(target))
        log.propagate = False
        for h in self.handlers:
            log.addHandler(h)
        self.old_level = log.level
        # The file gets everything; console handlers (the CLI's) filter by log_level.
        log.setLevel(logging.DEBUG)
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handlers:
            log.removeHandler(h)
            h.close()
        log.setLevel(self.old_level)
        log.propagate = self.old_propagate
