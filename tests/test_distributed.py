"""Masters built on a real dask.distributed LocalCluster (worker processes, loopback).

The cluster run must give the same files as the threaded run, order a flat after its dark,
survive a worker killed mid-master, and name the worker and path it cannot open.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import cloudpickle
import numpy as np
import pytest
import yaml
from astropy.io import fits
from typer.testing import CliRunner

from stacker import MasterFrameCreator
from stacker.cli import app
from stacker.cluster import RESOURCE
from stacker.engine import run_plan
from stacker.simulate import CameraModel, SimulationSpec, simulate

distributed = pytest.importorskip("distributed")

# Functions of this module run on the workers (client.run): send them by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

SHAPE = (40, 56)
N = 6
JOBS = {"bias", "dark_1.000s", "dark_60.000s", "flat_L_1.000s"}


def _cluster(**kw):
    return distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                    dashboard_address=":0", **kw)


@pytest.fixture(scope="module")
def client():
    with _cluster(resources={RESOURCE: 1}) as cluster, distributed.Client(cluster) as c:
        yield c


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    folder = tmp_path_factory.mktemp("raw")
    spec = SimulationSpec(camera=CameraModel(shape=SHAPE), n_bias=N, dark_exposures=(1.0, 60.0),
                          n_darks=N, flat_filters=("L",), flat_exposure=1.0, n_flats=N, seed=5)
    simulate(folder, spec)
    return folder


def config(raw: Path, out: Path, **extra) -> dict:
    return {"master_frames": {"bias_dir": str(raw / "bias"), "darks_dir": str(raw / "darks"),
                              "flats_dir": str(raw / "flats"), "output_dir": str(out),
                              "min_frames": 1, **extra}}


@pytest.fixture(scope="module")
def threaded(raw, tmp_path_factory):
    status = MasterFrameCreator(config(raw, tmp_path_factory.mktemp("threads")))\
        .create_all_master_frames()
    assert status.success, status.message
    return masters(status)


def masters(status) -> dict[str, dict]:
    return {m["job_id"]: m for m in status.details["masters"] if m["status"] == "built"}


def assert_same_masters(got: dict[str, dict], expected: dict[str, dict]) -> None:
    assert set(got) == set(expected) == JOBS
    for job_id, m in got.items():
        with fits.open(m["path"]) as a, fits.open(expected[job_id]["path"]) as b:
            # Same kernels on the same strips: identical, not merely close.
            np.testing.assert_array_equal(a[0].data, b[0].data, err_msg=job_id)
            np.testing.assert_array_equal(a["NUSED"].data, b["NUSED"].data, err_msg=job_id)
            for key in ("NCOMBINE", "DATAMEAN", "DATAMED", "DATASTD", "NORMFACT"):
                assert a[0].header.get(key) == b[0].header.get(key), (job_id, key)


def test_cluster_masters_equal_the_threaded_ones_and_progress_is_live(raw, tmp_path, client,
                                                                      threaded):
    calls: list[tuple[str, int, int]] = []
    creator = MasterFrameCreator(config(raw, tmp_path), client=client,
                                 progress=lambda *a: calls.append(a))
    status = creator.create_all_master_frames()
    assert status.success, status.message
    assert_same_masters(masters(status), threaded)
    assert client.status == "running"  # a client given by the caller is left open
    assert not list(tmp_path.glob(".*.part"))
    # Strips finished on the workers reached the caller's progress as scheduler events.
    finished = {job for job, done, total in calls if done == total and total > 0}
    assert finished == JOBS


def test_one_file_on_a_cluster_equals_the_threaded_one(raw, tmp_path, client, threaded):
    status = MasterFrameCreator(config(raw, tmp_path, save_individual_masters=False),
                                client=client).create_all_master_frames()
    assert status.success, status.message
    [path] = status.data
    with fits.open(path) as hdul:
        for job_id, m in threaded.items():
            with fits.open(m["path"]) as one:
                np.testing.assert_array_equal(hdul[job_id.upper()].data, one[0].data)


def test_a_flat_starts_only_after_its_dark_is_done(raw, tmp_path, client):
    with distributed.get_task_stream(client) as stream:
        status = MasterFrameCreator(config(raw, tmp_path), client=client)\
            .create_all_master_frames()
    assert status.success, status.message
    spans = {}
    for task in stream.data:
        job = re.match(r"stacker-(.+)-[0-9a-f]{8}$", str(task["key"]))
        if job:
            compute = [s for s in task["startstops"] if s["action"] == "compute"]
            spans[job[1]] = (compute[0]["start"], compute[-1]["stop"])
    assert set(spans) == JOBS
    assert spans["flat_L_1.000s"][0] >= spans["dark_1.000s"][1]


def test_a_worker_that_cannot_open_a_frame_is_named_with_the_path(raw, tmp_path, client):
    copy = tmp_path / "raw"
    shutil.copytree(raw / "bias", copy / "bias")
    creator = MasterFrameCreator({"master_frames": {"bias_dir": str(copy / "bias"),
                                                    "output_dir": str(tmp_path / "out")}})
    plan = creator.plan(["bias"])
    gone = plan.jobs[0].frames[2].path
    gone.unlink()  # planned from its header, then not there for the worker
    [result] = run_plan(plan, creator.settings, client=client)
    assert result.status == "failed"
    assert re.fullmatch(rf"worker tcp://127\.0\.0\.1:\d+: cannot open {re.escape(str(gone))}: "
                        r"No such file or directory; workers must see the input paths "
                        r"\(shared filesystem\)", result.error), result.error
    assert not list((tmp_path / "out").glob("*.fits"))


def _slow_reads(seconds: float) -> None:
    """On a worker: every strip read takes `seconds` longer (a master now lasts seconds)."""
    from stacker.io import StripReader

    original = StripReader.read

    def slow(self, y0, y1, *args, **kw):
        time.sleep(seconds)
        return original(self, y0, y1, *args, **kw)

    StripReader.read = slow


def test_a_worker_killed_mid_master_leaves_only_complete_equal_masters(raw, tmp_path,
                                                                       threaded):
    out = tmp_path / "out"
    with _cluster() as cluster, distributed.Client(cluster) as c:
        c.run(_slow_reads, 0.4)
        pids = c.run(os.getpid)
        box = {}
        run = threading.Thread(target=lambda: box.update(status=MasterFrameCreator(
            config(raw, out), client=c).create_all_master_frames()))
        run.start()
        victim = _busy_worker(c, out)
        os.kill(pids[victim], signal.SIGKILL)  # no clean-up of any kind: a lost node
        run.join(timeout=120)
        assert not run.is_alive()
        assert victim not in c.nthreads()  # the nanny started a new worker in its place
    status = box["status"]
    assert status.success, status.message
    assert_same_masters(masters(status), threaded)
    assert not list(out.glob(".*.part"))
    assert sorted(p.name for p in out.glob("master_*.fits")) == sorted(
        Path(m["path"]).name for m in masters(status).values())


def _busy_worker(c, out: Path, timeout: float = 60) -> str:
    """The address of a worker in the middle of a master (its .part file exists)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        busy = [w for w, keys in c.processing().items()
                if any(str(k).startswith("stacker-") for k in keys)]
        if busy and list(out.glob(".*.part")):
            return busy[0]
        time.sleep(0.05)
    raise AssertionError("no worker started a master")


def test_cli_builds_on_a_local_cluster(raw, tmp_path, threaded):
    out = tmp_path / "out"
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(config(raw, out)))
    result = CliRunner().invoke(app, ["masters", "--config", str(cfg), "--scheduler",
                                      "local:2"])
    assert result.exit_code == 0, result.output
    files = result.stdout.split()
    assert len(files) == 4
    for m in threaded.values():
        [mine] = [f for f in files if Path(f).name.startswith(
            Path(m["path"]).name.rsplit("_", 2)[0])]
        np.testing.assert_array_equal(fits.getdata(mine), fits.getdata(m["path"]))
    log = next(out.glob("master_frames_*.log")).read_text()
    assert "Dask cluster at tcp://127.0.0.1:" in log and "dashboard http" in log


def test_an_unreachable_scheduler_is_a_config_error(raw, tmp_path, monkeypatch):
    import stacker.cluster

    monkeypatch.setattr(stacker.cluster, "CONNECT_TIMEOUT", 1)
    status = MasterFrameCreator(config(raw, tmp_path, scheduler="tcp://127.0.0.1:9")) \
        .create_master_bias()
    assert not status.success
    assert status.details["exit_code"] == 2
    assert status.message.startswith(
        "master_frames.scheduler: cannot connect to tcp://127.0.0.1:9: ")
    assert not list(tmp_path.glob("*.fits"))


def test_a_cluster_rerun_keeps_up_to_date_masters_and_builds_the_rest(raw, tmp_path, client,
                                                                      threaded):
    out = tmp_path / "out"
    darks = MasterFrameCreator(config(raw, out)).create_master_darks()  # threads, first
    assert darks.success, darks.message
    status = MasterFrameCreator(config(raw, out), client=client).create_all_master_frames()
    assert status.success, status.message
    by_status = {m["job_id"]: m["status"] for m in status.details["masters"]}
    assert by_status == {"bias": "built", "dark_1.000s": "current", "dark_60.000s": "current",
                         "flat_L_1.000s": "built"}
    # The flat subtracted the dark of the first run, and equals the threaded flat.
    built = masters(status)
    with fits.open(built["flat_L_1.000s"]["path"]) as got, \
            fits.open(threaded["flat_L_1.000s"]["path"]) as want:
        np.testing.assert_array_equal(got[0].data, want[0].data)
