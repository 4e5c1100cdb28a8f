"""stacker on a SLURM cluster through dask-jobqueue (documented; not run in CI).

    pip install dask-jobqueue          # not a dependency of stacker
    python examples/slurm_jobqueue.py my_config.yaml

Each SLURM job is one Dask worker with `cores` threads. `memory_limit` in the stacker config
is the budget of one worker: keep it well below the job's `memory` (here 16 GiB of 24 GiB),
and set `num_workers` to the threads per worker or leave it null (then it is the worker's
thread count). Frames and the output folder must be on a filesystem every node mounts under
the same path (the log of the run names any worker that cannot open a path).
"""

from __future__ import annotations

import logging
import sys

from dask_jobqueue import SLURMCluster
from distributed import Client

from stacker import MasterFrameCreator
from stacker.cluster import RESOURCE

logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")

cluster = SLURMCluster(
    queue="normal",                  # your partition
    account=None,                    # your account, if the site needs one
    cores=8,                         # threads per worker = strips built at once on a node
    processes=1,                     # one worker per job: one memory budget per node
    memory="24GiB",                  # what SLURM grants; Dask's limit for the worker
    walltime="02:00:00",
    # one master at a time per worker: the scheduler then balances masters over nodes
    worker_extra_args=[f"--resources {RESOURCE}=1"],
    local_directory="$TMPDIR",       # Dask's spill folder on node-local disk
)
cluster.scale(jobs=4)                # 4 nodes; or cluster.adapt(minimum_jobs=1, maximum_jobs=8)

config = sys.argv[1] if len(sys.argv) > 1 else "my_config.yaml"
with Client(cluster) as client:
    client.wait_for_workers(1)
    print("dashboard:", client.dashboard_link)
    creator = MasterFrameCreator(config, overrides={"memory_limit": "16GiB"}, client=client)
    status = creator.create_all_master_frames()
    print(status.message)
cluster.close()
sys.exit(0 if status.success else 1)
