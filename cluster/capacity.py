"""What the cluster offers a pool, read from Ray: the nodes it is draining (a preemption notice,
a scale-down) and whether a node is alive; and the one request for capacity the driver makes of
Ray's autoscaler on behalf of all its pools."""

from __future__ import annotations

import functools
import logging

import ray

logger = logging.getLogger(__name__)

_REQUESTS: dict[int, list[dict]] = {}  # every pool's wish, by pool: one request for the driver


def request(pool: int, workers: int, bundle: dict) -> None:
    """Ask Ray's autoscaler for ``workers`` of ``pool``'s bundles (with every other pool's):
    its request replaces the last, and nodes it asked for stay until it is lowered."""
    bundles = [dict(bundle)] * workers if workers else []
    if _REQUESTS.get(pool) == bundles or (not bundles and pool not in _REQUESTS):
        return
    if bundles:
        _REQUESTS[pool] = bundles
    else:
        _REQUESTS.pop(pool, None)
    try:
        from ray.autoscaler.sdk import request_resources

        request_resources(bundles=[b for wish in _REQUESTS.values() for b in wish])
    except Exception as exc:  # noqa: BLE001 - a cluster without an autoscaler still renders
        logger.debug("could not ask the autoscaler for workers: %s", exc)


def draining_nodes() -> dict[str, float]:
    """Nodes Ray is draining: node id -> deadline in seconds since the epoch (0: none)."""
    try:
        client = _gcs_client(ray.get_runtime_context().gcs_address)
        return {node: ms / 1000.0 for node, ms in client.get_draining_nodes(timeout=5).items()}
    except Exception as exc:  # noqa: BLE001 - an older Ray, or a GCS hiccup: look again later
        logger.debug("could not read the draining nodes: %s", exc)
        return {}


@functools.cache
def _gcs_client(address: str):
    from ray._raylet import GcsClient

    return GcsClient(address=address)


def autoscaler_can_add(resource: str) -> bool:
    """Whether the cluster's autoscaler reported node types holding ``resource``: the cluster
    config an autoscaler reports to the GCS, which Ray Data and Ray Train read too. Ray's own
    autoscaler (2.60) reports none, and a cluster without an autoscaler has none: False."""
    try:
        from ray._private.state import state

        return bool((state.get_max_resources_from_cluster_config() or {}).get(resource))
    except Exception as exc:  # noqa: BLE001 - an older Ray, or a GCS hiccup: none reported
        logger.debug("could not read the autoscaler's cluster config: %s", exc)
        return False


def actor_placed(actor) -> bool:
    """Whether Ray has created ``actor`` on a node (not still waiting for resources)."""
    try:
        from ray._private.state import state

        return state.actor_table(actor._actor_id.hex()).get("State") == "ALIVE"
    except Exception as exc:  # noqa: BLE001 - a GCS hiccup: say not yet, ask again later
        logger.debug("could not read an actor's state: %s", exc)
        return False


def node_alive(node_id: str) -> bool:
    return any(n["NodeID"] == node_id and n["Alive"] for n in ray.nodes())


def total(resource: str) -> float:
    """How much of ``resource`` the cluster's alive nodes hold now (GPU, CPU)."""
    return float(ray.cluster_resources().get(resource, 0.0))
