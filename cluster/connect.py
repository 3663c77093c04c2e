"""Connect the driver to Ray: start a private local cluster, or join an existing one.

A local cluster binds to 127.0.0.1 with Ray's token authentication on (Ray's default for a new
local cluster since 2.52, unless RAY_AUTH_MODE=disabled is set), so nothing else on the network
can submit work to it. ``auto`` or ``host:port`` joins a running cluster (as a driver
started on the head node or by ``ray job submit``, which sets RAY_ADDRESS, does).
"""

from __future__ import annotations

import logging
import os

logger = logging.getLogger(__name__)


def connect(address: str | None) -> dict:
    """Initialise Ray for this process (once) and return the cluster's resources."""
    import ray

    if not ray.is_initialized():
        if address is None and not os.environ.get("RAY_ADDRESS"):
            ray.init(_node_ip_address="127.0.0.1", include_dashboard=False,
                     log_to_driver=False, logging_level=logging.WARNING)
            logger.info("started a local Ray cluster on 127.0.0.1")
        else:
            ray.init(address=address or os.environ.get("RAY_ADDRESS"), log_to_driver=False,
                     logging_level=logging.WARNING)
            logger.info("joined the Ray cluster at %s", address or os.environ["RAY_ADDRESS"])
    return ray.cluster_resources()


def default_num_workers(resources: dict, cpus_per_worker: int) -> tuple[int, bool]:
    """(workers, use_gpu): one worker per GPU when the cluster has GPUs, else CPUs / cpus each."""
    gpus = int(resources.get("GPU", 0))
    if gpus:
        return gpus, True
    return max(1, int(resources.get("CPU", 1)) // cpus_per_worker), False
