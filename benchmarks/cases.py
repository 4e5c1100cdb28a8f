"""One benchmark case, run in a fresh process so that its peak memory is its own.

    python -m benchmarks.cases '{"case": "stacker", "files": [...], ...}'

prints one JSON line: wall seconds, peak resident memory of this process (ru_maxrss),
bytes of input, and the output file when there is one.
"""

from __future__ import annotations

import errno
import json
import os
import resource
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np


def floor(files: list[str], rows: int = 64, **_) -> dict:
    """What reading the data costs: every input byte, strip by strip, into a float32 mean.

    Plain Python and numpy only: the header is read card by card here, because importing
    astropy to find the data (~0.15-0.2 s) is not a cost of reading and would pad the floor.
    """
    cards, offset = _plain_header(files[0])
    ny, nx = int(cards["NAXIS2"]), int(cards["NAXIS1"])
    out = np.empty((ny, nx), np.float32)
    acc = np.empty((rows, nx), np.float32)
    for y0 in range(0, ny, rows):
        y1 = min(y0 + rows, ny)
        acc[: y1 - y0] = 0
        for path in files:
            fd = os.open(path, os.O_RDONLY)
            buf = os.pread(fd, (y1 - y0) * nx * 2, offset + y0 * nx * 2)
            os.close(fd)
            acc[: y1 - y0] += np.frombuffer(buf, ">u2").reshape(y1 - y0, nx) ^ np.uint16(0x8000)
        out[y0:y1] = acc[: y1 - y0] / len(files)
    return {}


def disk(files: list[str], threads: int = 2, **_) -> dict:
    """What reading the bytes costs when they are not in memory: the cold floor.

    Every byte of every file, whole file after whole file, on `threads` threads (every
    other file each), in 16 MiB reads with O_DIRECT into a page-aligned buffer, computing
    nothing (this VM's disk served 4 MiB reads at 1.7 GB/s and 16 MiB ones at 2.5 GB/s).
    O_DIRECT bypasses the page cache, so this is what the disk delivers even if
    some pages were still cached. Where O_DIRECT is missing or the file system refuses it
    (open fails with EINVAL: tmpfs before Linux 6.6), plain reads are used instead, from
    disk only as far as the files were evicted (``--cold``); ``direct`` in the result says
    which.
    """
    with ThreadPoolExecutor(threads) as pool:
        direct = list(pool.map(_read_files, [files[i::threads] for i in range(threads)]))
    return {"direct": all(direct)}


def _read_files(files: list[str], chunk: int = 16 << 20) -> bool:
    """Read `files` in `chunk`-byte reads (a multiple of 4096); whether all were O_DIRECT."""
    raw = np.empty(chunk + 4096, np.uint8)
    # O_DIRECT needs the buffer's address, the file offset and the length aligned to the
    # device's logical block (4096 covers every common one); only the last read is short.
    start = -raw.ctypes.data % 4096
    buf = memoryview(raw[start : start + chunk])
    direct = True
    for path in files:
        fd, on = _open_direct(path)
        direct &= on
        try:
            size, done = os.fstat(fd).st_size, 0
            while done < size and (n := os.readv(fd, [buf])):
                done += n
        finally:
            os.close(fd)
    return direct


def _open_direct(path: str) -> tuple[int, bool]:
    flag = getattr(os, "O_DIRECT", 0)
    if flag:
        try:
            return os.open(path, os.O_RDONLY | flag), True
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
    return os.open(path, os.O_RDONLY), False


def _plain_header(path: str) -> tuple[dict[str, str], int]:
    """The value cards of a FITS file's primary header and the offset of its data (the
    benchmark's own files: uint16 images, BZERO 32768, data right after the header)."""
    cards: dict[str, str] = {}
    with open(path, "rb") as fh:
        while block := fh.read(2880):
            for i in range(0, len(block), 80):
                card = block[i : i + 80].decode("ascii")
                if card.rstrip() == "END":
                    return cards, fh.tell()
                if card[8:10] == "= ":
                    cards[card[:8].rstrip()] = card[10:].split("/")[0].strip()
    raise SystemExit(f"{path}: no END card in its header")


def stacker(files: list[str], out: str, method: str, memory_limit: str,
            max_iterations: int | None = None, quality_control: bool = False, **_) -> dict:
    """stacker's master dark of `files` (all one exposure) through the public API; with
    `quality_control` (the default of a user's run), frames are validated and the master
    measured (hot pixels, dark current, amp glow) and a bad-pixel mask written."""
    from stacker import MasterFrameCreator

    folder = Path(files[0]).parent
    settings = {"darks_dir": str(folder), "output_dir": out, "rejection_method": method,
                "memory_limit": memory_limit, "quality_control": quality_control,
                "min_frames": 1,
                "max_iterations": max_iterations, "log_level": "WARNING",
                "force": True}
    status = MasterFrameCreator({"master_frames": settings}).create_master_darks()
    if not status.success:
        raise SystemExit(status.message)
    return {"output": status.data[0]}


def _warm_up() -> None:
    """A worker imports stacker and loads its compiled kernels before the clock starts
    (numba's, unless they were compiled at install: `stacker.compiled`)."""
    import stacker.engine  # noqa: F401
    from stacker.compiled import kernel

    kernel("summarize")


def cluster(files: list[str], out: str, method: str, memory_limit: str, workers: int = 2,
            **_) -> dict:
    """The `stacker` case on a LocalCluster of `workers` processes (threads shared out).

    The cluster is started first and its start-up reported apart (`startup_seconds`): the
    case's wall time is the build alone, as on a cluster that is already running. Peak
    memory is this process's or the largest worker's (ru_maxrss of reaped children).
    """
    from distributed import Client, LocalCluster

    from stacker import MasterFrameCreator
    from stacker.cluster import RESOURCE

    start = time.perf_counter()
    threads = max(1, (os.cpu_count() or 1) // workers)
    with LocalCluster(n_workers=workers, threads_per_worker=threads, processes=True,
                      resources={RESOURCE: 1}, dashboard_address=":0") as lc, Client(lc) as c:
        c.run(_warm_up)
        startup = time.perf_counter() - start
        build = time.perf_counter()
        folder = Path(files[0]).parent
        settings = {"darks_dir": str(folder), "output_dir": out, "rejection_method": method,
                    "memory_limit": memory_limit, "quality_control": False, "min_frames": 1,
                    "log_level": "WARNING"}
        status = MasterFrameCreator({"master_frames": settings}, client=c).create_master_darks()
        seconds = time.perf_counter() - build
    if not status.success:
        raise SystemExit(status.message)
    return {"output": status.data[0], "startup_seconds": startup, "build_seconds": seconds}


def flats(files: list[str], out: str, method: str, memory_limit: str, darks: str,
          quality_control: bool = False, **_) -> dict:
    """stacker's master flat of `files`: dark subtraction, per-frame scaling, rejection,
    normalization (and with `quality_control`, frame validation and the flat's metrics).
    The master dark is built first, untimed, into the same output folder."""
    from stacker import MasterFrameCreator

    settings = {"darks_dir": darks, "flats_dir": str(Path(files[0]).parent),
                "output_dir": out, "rejection_method": method, "memory_limit": memory_limit,
                "quality_control": quality_control, "min_frames": 1, "log_level": "WARNING",
                "force": True}
    creator = MasterFrameCreator({"master_frames": settings})
    if not list(Path(out).glob("master_dark_*.fits")):
        raise SystemExit("run the flats case after its dark: build_dark first")
    status = creator.create_master_flats()
    if not status.success:
        raise SystemExit(status.message)
    return {"output": status.data[0]}


def build_dark(files: list[str], out: str, darks: str, **_) -> dict:
    """Setup for `flats`: the master dark it subtracts (not a measured case)."""
    from stacker import MasterFrameCreator

    settings = {"darks_dir": darks, "output_dir": out, "min_frames": 1,
                "log_level": "WARNING"}
    status = MasterFrameCreator({"master_frames": settings}).create_master_darks()
    if not status.success:
        raise SystemExit(status.message)
    return {}


def siril(files: list[str], out: str, **_) -> dict:
    """Siril's sigma-clipped stack of the same files (``siril-cli``, its own threads):
    linked as a sequence, then ``stack rej s 3 3 -nonorm`` (median centre, iterated)."""
    import shutil
    import subprocess

    work = Path(out) / "siril"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    script = work / "stack.ssf"
    script.write_text(f"""requires 1.0.0
setext fits
cd {Path(files[0]).parent}
link frame -out={work}
cd {work}
stack frame rej s 3 3 -nonorm -out={work / 'master'}
""")
    proc = subprocess.run(["siril-cli", "-s", str(script)], capture_output=True, text=True)
    if proc.returncode != 0 or not (work / "master.fits").exists():
        raise SystemExit("siril-cli failed: " + (proc.stdout + proc.stderr)[-300:])
    return {"output": str(work / "master.fits")}


def ccdproc(files: list[str], out: str, method: str, **_) -> dict:
    """ccdproc.combine: median-centred, std-spread 3-sigma clip (one pass: ccdproc does not
    iterate), or min/max dropping one of each."""
    import ccdproc as cp
    from astropy.stats import mad_std  # noqa: F401 - documents the alternative spread

    kwargs = {"method": "average", "unit": "adu", "dtype": np.float32}
    if method == "sigma_clip":
        kwargs.update(sigma_clip=True, sigma_clip_low_thresh=3, sigma_clip_high_thresh=3,
                      sigma_clip_func=np.ma.median, sigma_clip_dev_func=np.ma.std)
    elif method == "minmax":
        kwargs.update(clip_extrema=True, nlow=1, nhigh=1)
    path = Path(out) / "ccdproc.fits"
    Path(out).mkdir(parents=True, exist_ok=True)
    combined = cp.combine(files, **kwargs)
    combined.write(path, overwrite=True)
    return {"output": str(path)}


CASES = {"floor": floor, "disk": disk, "stacker": stacker, "cluster": cluster, "ccdproc": ccdproc,
         "flats": flats, "build_dark": build_dark, "siril": siril}


def main() -> None:
    args = json.loads(sys.argv[1])
    start = time.perf_counter()
    extra = CASES[args["case"]](**args)
    seconds = extra.pop("build_seconds", time.perf_counter() - start)
    # kB on Linux; a case that runs another program (Siril) counts that program's peak
    peak = 1024 * max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                      resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
    print(json.dumps({"seconds": seconds, "peak_bytes": peak, **extra}))


if __name__ == "__main__":
    main()
