"""Connect the driver to Ray: start a private local cluster, or join an existing one.

A local cluster binds to 127.0.0.1 with Ray's token authentication on (Ray's default for a new
local cluster since 2.52, unless RAY_AUTH_MODE=disabled is set), so nothing else on the network
can submit work to it. ``auto`` or ``host:port`` joins a running cluster (as a driver
started on the head node or by ``ray job submit``, which sets RAY_ADDRESS, does).

Joining fails within seconds, on one line, when no cluster answers: the address is resolved
and its port tried here first, and Ray's own retries (minutes of warnings by default) are cut
short while it connects.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import sys
import tempfile
import threading
from urllib.parse import urlsplit

logger = logging.getLogger(__name__)

# How long the address's port has to accept a TCP connection.
PROBE_TIMEOUT_S = 5.0
# Ray's settings for joining (RAY_<name>; one already in the environment wins), verified on Ray
# 2.60: how many times ray.init tries the GCS (default 20, about 1 s apart), how long a gRPC
# channel to it waits to connect (default 5 s; ray.init opens two, one after the other), and
# how long its first call waits for an answer (default 30 s). Something that accepts
# connections but is not a Ray cluster then costs about 2 x 3 + 5 s instead of 14 minutes.
_JOIN_SETTINGS = {
    "RAY_gcs_server_port_wait_time_s": "1",
    "RAY_gcs_rpc_server_connect_timeout_s": "3",
    "RAY_py_gcs_connect_timeout_s": "5",
}
# (logger, message start) of the Ray warnings connect() drops; see _without_ray_notices.
_RAY_NOTICES = (
    ("ray._private.authentication.authentication_token_setup",
     "Token authentication is enabled for this Ray cluster"),
    ("ray._private.services", "Found multiple active Ray instances"),
)


class ClusterUnreachable(ConnectionError):
    """No Ray cluster answered at the address this driver was told to join; the message is one
    line: what was tried, and how to fix it."""


def connect(address: str | None, num_cpus: int | None = None) -> dict:
    """Initialise Ray for this process (once) and return the cluster's resources.

    ``num_cpus`` sets a local cluster's logical CPUs (default: the machine's). Raises
    ``ClusterUnreachable`` when a cluster to join does not answer.
    """
    import ray

    if not ray.is_initialized():
        main_thread = threading.current_thread() is threading.main_thread()
        previous_sigterm = signal.getsignal(signal.SIGTERM) if main_thread else None
        try:
            if address is None and not os.environ.get("RAY_ADDRESS"):
                # "local": with no address Ray joins any cluster running on this machine
                # (another user's included) and hangs if that cluster goes away.
                _keep_on_loopback()
                with _without_ray_notices():
                    ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=False,
                             log_to_driver=False, logging_level=logging.WARNING, num_cpus=num_cpus)
                logger.info("started a local Ray cluster on 127.0.0.1")
            else:
                _join(address)
        except SystemExit as exc:
            # Ray's own handler, in force while ray.init runs, made a SIGTERM an exit: hand the
            # signal to the driver's handler, so it stops as cleanly here as anywhere else.
            if exc.code == signal.SIGTERM and callable(previous_sigterm):
                previous_sigterm(signal.SIGTERM, None)
            raise
        finally:
            # ray.init makes SIGTERM exit the driver at once; give it back to the handler the
            # driver set, so a scheduler's stop still records the run and keeps its committed work.
            if previous_sigterm is not None:
                signal.signal(signal.SIGTERM, previous_sigterm)
    return ray.cluster_resources()


def _join(address: str | None) -> None:
    """Join the cluster ``address`` (``auto``, ``host:port``, or None with RAY_ADDRESS set)
    names, or raise ``ClusterUnreachable`` within seconds."""
    import ray

    what, target, origin, fix = _resolve(address)
    host, port, dialled = _dialled(target, what, fix)
    at = f"at {target} ({origin})" if origin else "there"
    problem = _probe(host, port)
    if problem:
        via = f"; Ray dials it as {dialled}" if dialled != target else ""
        raise ClusterUnreachable(f"{what}: no Ray cluster answered {at} within "
                                 f"{PROBE_TIMEOUT_S:g} s ({problem}{via}); {fix}")
    # ray.init is given what it was given before (auto stays auto: only then does Ray turn token
    # authentication on by itself when it finds a token); it resolves auto as _resolve did.
    held: list[str] = []
    try:
        with _join_settings(), _without_ray_notices(), _stderr_held(held):
            ray.init(address=address or os.environ["RAY_ADDRESS"], log_to_driver=False,
                     logging_level=logging.WARNING)
    except ConnectionError as exc:
        logger.debug("Ray's output while failing to join %s: %s", dialled, "".join(held))
        cause = f"{exc} {exc.__cause__ or ''}"
        if "InvalidAuthToken" in cause or "Unauthenticated" in cause:
            raise ClusterUnreachable(
                f"{what}: the Ray cluster {at} refused this driver's authentication "
                f"token; set RAY_AUTH_MODE=token and the cluster's token in RAY_AUTH_TOKEN "
                f"(or ~/.ray/auth_token)") from exc
        raise ClusterUnreachable(
            f"{what}: something accepts connections {at} but it is not a Ray cluster that "
            f"answers (a head's GCS port is 6379 unless `ray start --port` chose another); "
            f"{fix}") from exc
    except BaseException:  # not a failure to reach the cluster: what Ray said may tell why
        sys.stderr.write("".join(held))
        raise
    # Joined: what Ray said is shown as it would have been.
    sys.stderr.write("".join(held))
    logger.info("joined the Ray cluster at %s", target)


def _resolve(address: str | None) -> tuple[str, str, str, str]:
    """(what was asked, for messages; the address to try; where that came from, when not
    from what was asked; how to fix it when it fails).

    ``auto`` means RAY_ADDRESS, else the cluster ``ray start`` recorded on this machine. Ray
    would also join any other Ray it finds running here (another driver's private cluster, or
    another user's), and hang on one bound to 127.0.0.1, so that guess is not made.
    """
    from ray._private.utils import get_ray_address_file

    start = "start one with `ray start --head`"
    unset = "leave cluster.address unset to start a private local cluster"
    env = os.environ.get("RAY_ADDRESS")
    if address is None:
        return (f"RAY_ADDRESS {env}", env, "",
                f"{start}, fix RAY_ADDRESS, or unset it to start a private local cluster")
    if address != "auto":
        port = address.rsplit(":", 1)[-1]
        if port.isdigit():
            start = f"start one with `ray start --head --port={port}`"
        return f"cluster.address {address}", address, "", f"{start}, fix the address, or {unset}"
    if env:
        return "cluster.address auto", env, "RAY_ADDRESS", f"{start}, fix RAY_ADDRESS, or {unset}"
    record = get_ray_address_file(None)
    try:
        with open(record) as f:
            recorded = f.read().strip()
    except OSError:
        recorded = ""
    if not recorded:
        raise ClusterUnreachable(
            f"cluster.address auto: no Ray cluster to join on this machine (RAY_ADDRESS is not "
            f"set and `ray start` recorded none in {record}); {start}, give its host:port as "
            f"cluster.address, or {unset}")
    return ("cluster.address auto", recorded, f"recorded by `ray start` in {record}",
            f"{start}, or {unset}")


def _dialled(target: str, what: str, fix: str) -> tuple[str, int, str]:
    """The host and port Ray will connect to for ``target``, and both as ``host:port``.

    Ray swaps a loopback host for this machine's routable address, so a cluster that listens
    on 127.0.0.1 only is not reachable as 127.0.0.1:port; the port tried is the one Ray uses.
    """
    from ray._private import services

    if "://" in target:  # ray://host:port (Ray Client): Ray dials it as given
        parts = urlsplit(target)
        host, port = parts.hostname, parts.port
    else:
        host, port = services.parse_address(target) or (None, None)
        if host:
            host = services.resolve_ip_for_localhost(host)
    if not host or not str(port).isdigit():
        raise ClusterUnreachable(f"{what}: {target} is not an address to join (host:port, or "
                                 f"auto); {fix}")
    return host, int(port), f"{host}:{port}"


def _probe(host: str, port: int) -> str | None:
    """None when ``host:port`` accepts a TCP connection within PROBE_TIMEOUT_S, else why not."""
    try:
        with socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S):
            return None
    except socket.timeout:
        return "no answer"
    except socket.gaierror:
        return f"{host} is not a known host name"
    except ConnectionRefusedError:
        return "connection refused"
    except OSError as exc:
        return exc.strerror or type(exc).__name__


@contextlib.contextmanager
def _join_settings():
    """Ray's join retries cut short (``_JOIN_SETTINGS``) for one ray.init.

    Ray reads RAY_<name> settings into its C++ config once, so they are set in the environment
    and the config read again; the environment is restored after (its children never see them).
    """
    from ray._raylet import Config

    added = {k: v for k, v in _JOIN_SETTINGS.items() if k not in os.environ}
    os.environ.update(added)
    try:
        Config.initialize("")
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


class _DropNotice(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


@contextlib.contextmanager
def _without_ray_notices():
    """Drop two of Ray's warnings while ray.init runs; every other one still shows.

    "Token authentication is enabled ... Set RAY_AUTH_MODE=disabled to opt out": token auth on
    is what reelfarm asks for (Ray's warning that it is *disabled* still shows). "Found multiple
    active Ray instances ... Connecting to latest cluster at": ``auto`` means the cluster
    ``ray start`` recorded, which Ray then joins, as _resolve checked; the others are Rays found
    running on this machine (other drivers' private clusters), never candidates.
    """
    added = [(logging.getLogger(name), _DropNotice(prefix)) for name, prefix in _RAY_NOTICES]
    for notice_logger, notice_filter in added:
        notice_logger.addFilter(notice_filter)
    try:
        yield
    finally:
        for notice_logger, notice_filter in added:
            notice_logger.removeFilter(notice_filter)


@contextlib.contextmanager
def _stderr_held(held: list[str]):
    """Hold what is written to file descriptor 2 (where Ray's C++ core logs each failed try)
    for the block, and append it to ``held`` after. The caller shows it or not."""
    try:
        saved = os.dup(2)
    except OSError:  # no stderr to hold
        yield
        return
    with tempfile.TemporaryFile() as buffer:
        sys.stderr.flush()
        os.dup2(buffer.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            buffer.seek(0)
            held.append(buffer.read().decode(errors="replace"))


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
