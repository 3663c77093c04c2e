"""Connect the driver to Ray: start a private local cluster, or join an existing one.

A local cluster binds to 127.0.0.1 with Ray's token authentication on (Ray's default for a new
local cluster since 2.52, unless RAY_AUTH_MODE=disabled is set), so nothing else on the network
can submit work to it. ``auto`` or ``host:port`` joins a running cluster (as a driver
started on the head node or by ``ray job submit``, which sets RAY_ADDRESS, does).
"""

from __future__ import annotations

import logging
import os
import signal
import threading

logger = logging.getLogger(__name__)


def connect(address: str | None, num_cpus: int | None = None) -> dict:
    """Initialise Ray for this process (once) and return the cluster's resources.

    ``num_cpus`` sets a local cluster's logical CPUs (default: the machine's).
    """
    import ray

    if not ray.is_initialized():
        main_thread = threading.current_thread() is threading.main_thread()
        previous_sigterm = signal.getsignal(signal.SIGTERM) if main_thread else None
        if address is None and not os.environ.get("RAY_ADDRESS"):
            # "local": with no address Ray joins any cluster running on this machine (another
            # user's included) and hangs if that cluster goes away.
            _keep_on_loopback()
            ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=False,
                     log_to_driver=False, logging_level=logging.WARNING, num_cpus=num_cpus)
            logger.info("started a local Ray cluster on 127.0.0.1")
        else:
            ray.init(address=address or os.environ.get("RAY_ADDRESS"), log_to_driver=False,
                     logging_level=logging.WARNING)
            logger.info("joined the Ray cluster at %s", address or os.environ["RAY_ADDRESS"])
        # ray.init makes SIGTERM exit the driver at once; give it back to the handler the driver
        # set, so a scheduler's stop still records the run and keeps its committed work.
        if previous_sigterm is not None:
            signal.signal(signal.SIGTERM, previous_sigterm)
    return ray.cluster_resources()


def _keep_on_loopback() -> None:
    """Make a local cluster bind to 127.0.0.1.

    Ray swaps 127.0.0.1 for the machine's routable address unless it is told the cluster is a
    single machine, through the switch it reads for laptops (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER).
    The variable reaches the processes the cluster starts; the constant covers a Ray that this
    process imported already.
    """
    from ray._private import ray_constants

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False


def default_num_workers(resources: dict, cpus_per_worker: int) -> tuple[int, bool]:
    """(workers, use_gpu): one worker per GPU when the cluster has GPUs, else CPUs / cpus each."""
    gpus = int(resources.get("GPU", 0))
    if gpus:
        return gpus, True
    return max(1, int(resources.get("CPU", 1)) // cpus_per_worker), False
