"""The local cluster a render starts is private: loopback only, token authentication on."""

from __future__ import annotations

import psutil


def test_local_cluster_listens_on_loopback_only_with_token_auth(ray_local):
    import ray
    from ray._raylet import AuthenticationMode, get_authentication_mode

    assert {n["NodeManagerAddress"] for n in ray.nodes()} == {"127.0.0.1"}
    assert ray.get_runtime_context().gcs_address.startswith("127.0.0.1:")
    assert get_authentication_mode() == AuthenticationMode.TOKEN

    cluster = [p for p in psutil.Process().children(recursive=True)
               if any(name in p.name() for name in ("gcs_server", "raylet"))]
    assert cluster, "the local cluster's gcs_server and raylet are children of this process"
    listening = {c.laddr.ip for p in cluster for c in p.net_connections(kind="inet")
                 if c.status == psutil.CONN_LISTEN}
    assert listening and listening <= {"127.0.0.1", "::ffff:127.0.0.1"}, listening
