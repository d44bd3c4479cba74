"""Ray for the sharded index: joining (or starting) a Ray cluster (``connect``) and the
sharded build's shards as Ray tasks (``ray_runner``, ``knnlm-build-index --engine ray``).

Ray is imported here only, lazily: the default engine (no --engine / --knn-engine) never
imports it. Without an address (--ray-address, or RAY_ADDRESS), ``ray.init`` starts an
embedded local cluster that ends with the process; with one it joins that cluster, whose
nodes must see the datastore and index files at the same paths (a shared file system) and
have this package installed. FAISS indexes do not pickle (and large ones pass pickle's
4 GiB limit): tasks and actors get paths and read the files themselves.

A shard task that dies (worker killed, node lost) is retried by Ray (``TASK_RETRIES``); a
shard already written is not redone by a rerun of the build (index/sharded.py).
"""

from __future__ import annotations

import logging
import os
from typing import Any, Iterable, Optional

from fairseq_knnlm.errors import KNNLMError

logger = logging.getLogger(__name__)

TASK_RETRIES = 3  # attempts after the first for a shard task whose worker dies
CANCEL_WAIT_S = 30.0  # how long a stopped build waits for its cancelled tasks to end


class RayUnavailable(KNNLMError):
    """Ray is not installed, or the cluster cannot be reached."""


def _ray() -> Any:
    try:
        import ray
    except ImportError:
        raise RayUnavailable("--engine ray / --knn-engine ray needs Ray: pip install "
                             "'fairseq-knnlm[ray]' (or bash install.sh)") from None
    return ray


def worker_env(threads: Optional[int] = None) -> dict[str, Any]:
    """The runtime environment of our Ray workers: the plain modules only (no fairseq: its
    import costs ~300 MB and seconds per worker), the same OpenMP wait policy, and (threads)
    OMP_NUM_THREADS, which FAISS's BLAS reads when it loads (Ray sets 1 by default)."""
    from fairseq_knnlm import NO_FAIRSEQ_ENV
    from fairseq_knnlm.index.sharded import KILL_SHARD_ENV

    env = {NO_FAIRSEQ_ENV: "1", "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY",
                                                                  "PASSIVE")}
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    if os.environ.get(KILL_SHARD_ENV):  # testing aid, passed on to the workers
        env[KILL_SHARD_ENV] = os.environ[KILL_SHARD_ENV]
    return {"env_vars": env}


def connect(address: Optional[str] = None) -> Any:
    """Ray, initialised: an already running session is reused; else ``address`` (or
    RAY_ADDRESS) is joined, or an embedded local cluster started. One line on failure."""
    ray = _ray()
    if ray.is_initialized():
        return ray
    addr = address or os.environ.get("RAY_ADDRESS") or None
    try:
        if addr is None:
            ray.init(include_dashboard=False, logging_level=logging.WARNING,
                     log_to_driver=False)
        else:
            ray.init(address=addr, logging_level=logging.WARNING, log_to_driver=False)
    except Exception as e:  # noqa: BLE001  (ConnectionError, RuntimeError, ...)
        where = f"--ray-address {addr}" if addr else "a local Ray instance"
        raise RayUnavailable(f"cannot start or join {where}: "
                             f"{str(e).splitlines()[0] if str(e) else type(e).__name__}"
                             ) from e
    res = ray.cluster_resources()
    logger.info("Ray %s: %d node(s), %g CPUs, %.1f GB of memory for tasks",
                addr or "(local)", len([n for n in ray.nodes() if n.get("Alive")]),
                res.get("CPU", 0), res.get("memory", 0) / 1e9)
    return ray


def node_memory(ray: Any) -> list[float]:
    """Bytes of Ray's 'memory' resource on each live node (what actors may reserve)."""
    return [float(n.get("Resources", {}).get("memory", 0)) for n in ray.nodes()
            if n.get("Alive")]


def ray_runner(address: Optional[str] = None, cpus_per_task: float = 1.0):
    """A runner for index.sharded.build_index_sharded: each shard a Ray task (retried if its
    worker dies), yielding (task index, keys added) as they finish."""

    def run(tasks: list[tuple]) -> Iterable[tuple[int, int]]:
        if not tasks:
            return
        ray = connect(address)
        from fairseq_knnlm.index.sharded import add_shard

        remote = ray.remote(add_shard).options(
            num_cpus=cpus_per_task, max_retries=TASK_RETRIES, retry_exceptions=False,
            runtime_env=worker_env(int(tasks[0][6]) or None))
        refs = {remote.remote(*t): j for j, t in enumerate(tasks)}
        pending = list(refs)
        try:
            while pending:
                ready, pending = ray.wait(pending, num_returns=1)
                for r in ready:
                    j = refs[r]
                    try:
                        yield j, int(ray.get(r))
                    except ray.exceptions.RayError as e:
                        i, n = tasks[j][7]["shard_id"], tasks[j][7]["num_shards"]
                        cause = getattr(e, "cause", None) or e
                        if isinstance(cause, KNNLMError):
                            raise type(cause)(f"shard {i} of {n}: {cause}") from e
                        raise KNNLMError(f"shard {i} of {n} ({tasks[j][4]}) failed on Ray "
                                         f"after {TASK_RETRIES} retries: "
                                         f"{str(cause).splitlines()[0]}") from e
        finally:  # stopped early (an error, Ctrl-C): no task goes on writing after it
            for r in pending:
                ray.cancel(r, force=True)
            if pending:
                ray.wait(pending, num_returns=len(pending), timeout=CANCEL_WAIT_S)

    return run
