"""The output folder across runs: one run at a time, leftovers cleaned, finished work reused.

- `OutputLock` holds an exclusive ``flock`` on ``<output_dir>/.stacker.lock`` for a run; a
  second run on the same folder stops at once with a message naming the holder. The kernel
  drops the lock when the process dies (even by SIGKILL), so a crash never leaves it stale.
- `clean_leftovers` removes what a killed run left behind: ``.<name>.part`` temp files and
  ``.stacker-work-*`` folders. Only called with the lock held, so nothing live is touched.
- `fingerprint` digests what decides a master's pixels (its frames' paths, sizes and
  modification times, the rejection settings, the master it subtracts); `MasterIndex` finds a
  master already on disk with the same job id and fingerprint, so a rerun skips it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stacker.errors import OutputLockedError
from stacker.fitsheader import read_hdus

if TYPE_CHECKING:
    from stacker.config import Settings
    from stacker.plan import Job

log = logging.getLogger("stacker")

LOCK_NAME = ".stacker.lock"
#: FITS card holding a master's fingerprint.
FINGERPRINT_CARD = "STKFP"
#: Bumped when the meaning of a fingerprint changes, so old masters are rebuilt once.
FINGERPRINT_VERSION = 1


class OutputLock:
    """Exclusive use of an output folder for the duration of a ``with`` block.

    Raises
    ------
    OutputLockedError
        When another process holds the folder: names it (pid, host, start) and the fix.
    """

    def __init__(self, folder: Path) -> None:
        self.path = Path(folder) / LOCK_NAME
        self.fd: int | None = None

    def __enter__(self) -> OutputLock:
        import fcntl
        from datetime import datetime

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "another run"
            os.close(fd)
            raise OutputLockedError(
                f"output folder {self.path.parent} is in use by {holder}; wait for that run "
                "to finish or choose another output_dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"stacker pid {os.getpid()} on {socket.gethostname()} since "
                      f"{datetime.now():%Y-%m-%d %H:%M:%S}\n".encode(), 0)
        self.fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        if self.fd is not None:
            # The lock file stays (removing it would race with a run about to lock it).
            os.ftruncate(self.fd, 0)
            os.close(self.fd)  # closing releases the flock
            self.fd = None


def clean_leftovers(folder: Path) -> list[Path]:
    """Remove temp files and work folders of runs that were killed; returns what went."""
    removed = []
    for path in sorted(folder.glob(".*.part")):
        path.unlink(missing_ok=True)
        removed.append(path)
    for path in sorted(folder.glob(".stacker-work-*")):
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    for path in removed:
        log.info("removed %s, left by an interrupted run", path.name)
    return removed


def fingerprint(job: Job, settings: Settings, calibration: str | None = None) -> str:
    """Digest of everything that decides `job`'s pixels (hex, 40 characters).

    Parameters
    ----------
    job : Job
        Its id, kind and frames (path, size, modification time).
    settings : Settings
        Rejection and its options, quality control, min_frames; for flats the normalization.
    calibration : str, optional
        The fingerprint of the master the job subtracts (a job of this run or a file).
    """
    recipe: dict[str, Any] = {
        "version": FINGERPRINT_VERSION,
        "job": job.id,
        "frames": [[str(f.path), f.size, f.mtime] for f in job.frames],
        "rejection": settings.rejection_method,
        "options": settings.kernel_options(),
        "quality_control": settings.quality_control,
        "min_frames": settings.min_frames,
        "calibration": calibration,
    }
    if job.kind == "flat":
        recipe["normalization"] = settings.normalization_method
    text = json.dumps(recipe, sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()


def file_fingerprint(path: Path) -> str:
    """Fingerprint of a master file used as is (flats built against an existing dark)."""
    hdus = read_hdus(path, (FINGERPRINT_CARD,))
    try:
        stored = (hdus[0][0] if hdus else _astropy_headers(path)[0]).get(FINGERPRINT_CARD)
    except (OSError, ValueError, IndexError):
        stored = None
    st = path.stat()
    return stored or f"{path}:{st.st_size}:{st.st_mtime}"


@dataclass(frozen=True)
class Existing:
    """A master on disk: its file and the statistics cards of its header (lower-case)."""

    path: Path
    stats: dict[str, Any]


@dataclass
class MasterIndex:
    """Masters already in an output folder, by (job id, fingerprint)."""

    found: dict[tuple[str, str], Existing] = field(default_factory=dict)

    @classmethod
    def scan(cls, folder: Path, stat_cards: tuple[str, ...] = ()) -> MasterIndex:
        """Read the primary headers (and MEF extension headers) of ``master_*.fits``.

        The `stat_cards` of each header are kept, so a master that is reused needs no
        second read.
        """
        index = cls()
        wanted = ("MASTERID", FINGERPRINT_CARD, *stat_cards)
        for path in sorted(Path(folder).glob("master_*.fits")):
            # stacker's own masters are read without astropy (its import costs ~0.2 s).
            hdus = read_hdus(path, wanted)
            try:
                headers = ([h for h, _ in hdus] if hdus is not None
                           else _astropy_headers(path))
            except (OSError, ValueError) as exc:
                log.debug("not indexing %s: %s", path, exc)
                continue
            for h in headers:
                if "MASTERID" in h and FINGERPRINT_CARD in h:
                    stats = {k.lower(): h[k] for k in stat_cards if k in h}
                    key = (str(h["MASTERID"]), str(h[FINGERPRINT_CARD]))
                    index.found[key] = Existing(path, stats)
        return index

    def get(self, job_id: str, digest: str) -> Existing | None:
        """The master of `job_id` built with `digest`, if one is on disk."""
        return self.found.get((job_id, digest))


def _astropy_headers(path: Path) -> list:
    from astropy.io import fits

    with fits.open(path, memmap=False, lazy_load_hdus=True) as hdul:
        return [hdu.header for hdu in hdul]


def check_free_space(folder: Path, need: int, what: str) -> None:
    """Fail before computing when the output folder's disk cannot hold the master.

    Raises
    ------
    BuildError
        Naming the master, what it needs and what is free.
    """
    from stacker.config import format_size
    from stacker.errors import BuildError

    free = shutil.disk_usage(folder).free
    if free < need:
        raise BuildError(f"{what} needs {format_size(need)} but only {format_size(free)} is free "
                         f"in {folder}; free some space or choose another output_dir")


def writable_folder(folder: Path, key: str) -> Path:
    """Create `folder` if needed and prove it takes files, before any work starts.

    Raises
    ------
    ConfigError
        Naming the setting `key`, the folder and the reason (a file in the way, a read-only
        disk, no permission).
    """
    import tempfile

    from stacker.errors import ConfigError

    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".stacker-probe-"):
            pass
    except FileExistsError:
        raise ConfigError(f"master_frames.{key} {folder} is a file, not a folder; choose a "
                          "folder") from None
    except OSError as exc:
        raise ConfigError(f"master_frames.{key} {folder} is not writable ({exc.strerror or exc}); "
                          "choose a folder you can write to") from None
    return folder
