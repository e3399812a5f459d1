"""Whether every Ray node can reach the tracking server (docs/design.md#10), and what the sweep tells Ray.

On more than one machine the tracking URI is a routable address; loopback is for one machine only. The
decision is pure (URI and node addresses in, decision out) so it is unit tested; `check_tracking_reaches_nodes`
gathers the addresses from Ray and acts on it.
"""
from __future__ import annotations

import ipaddress
import logging
import os
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit

from soups.tracking_server import password_in_uri

LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"}
REMOTE_SCHEMES = {"http", "https", "databricks", "databricks-uc", "uc"}  # reached over the network


@dataclass(frozen=True)
class TrackingDecision:
    action: str  # "use" | "refuse"
    uri: str | None = None
    message: str = ""  # why it refuses, in one line


def is_loopback_host(host: str) -> bool:
    """localhost names, 127.0.0.0/8, ::1 and the unspecified address (0.0.0.0 reaches only this machine)."""
    host = host.strip("[]").lower()
    if host in LOOPBACK_NAMES or host.endswith(".localhost"):
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    return ip.is_loopback or ip.is_unspecified


def decide_tracking(uri: str | None, node_ips: list[str], driver_ip: str, *, can_grow: bool = False,
                    autostarted_uri: str | None = None, host_ips: list[str] | None = None) -> TrackingDecision:
    """Whether every Ray node can log to the tracking server.

    uri: MLFLOW_TRACKING_URI as the user set it (None: unset, and the project started autostarted_uri);
    node_ips: the alive nodes' addresses; driver_ip: this process's node address; can_grow: the autoscaler
    may add nodes (a cluster scaled to zero workers is one machine only until the first trial asks for one);
    host_ips: what the URI's host name resolves to here (a name that resolves to loopback only is loopback).
    A loopback node address is this machine's (a node bound to 127.0.0.1 cannot be joined from elsewhere).
    """
    if uri and (refusal := password_in_uri(uri)):
        return TrackingDecision("refuse", message=refusal)
    effective = uri or autostarted_uri
    remote = sorted({ip for ip in node_ips if not is_loopback_host(ip) and ip != driver_ip})
    all_loopback = all(is_loopback_host(ip) for ip in node_ips)
    if not remote and not (can_grow and not all_loopback):  # one machine: loopback is fine
        return TrackingDecision("use", uri=effective)
    spans = (f"Ray spans {1 + len(remote)} machines ({', '.join([driver_ip, *remote])})" if remote else
             f"Ray's autoscaler can add nodes to this cluster (head {driver_ip})")
    hint = f"set MLFLOW_TRACKING_URI to an address every node reaches, e.g. http://{driver_ip}:5000"
    parts = urlsplit(effective or "")
    scheme = parts.scheme.lower() or (effective or "").lower()  # "databricks" alone is a scheme too
    loopback = is_loopback_host(parts.hostname or "localhost") or bool(
        host_ips and all(is_loopback_host(ip) for ip in host_ips))
    if scheme in ("http", "https") and not loopback:
        return TrackingDecision("use", uri=effective)
    if scheme in REMOTE_SCHEMES - {"http", "https"}:
        return TrackingDecision("use", uri=effective)
    if uri is None:
        return TrackingDecision("refuse", message=(
            f"MLFLOW_TRACKING_URI is not set and the project's MLflow server listens on {effective} (loopback) but "
            f"{spans}; {hint} (or pass --mlflow-host auto to start the server on this machine's address)"))
    if scheme not in ("http", "https"):
        return TrackingDecision("refuse", message=(
            f"MLFLOW_TRACKING_URI is {uri} (a store on this machine; trials talk HTTP to a tracking server) "
            f"but {spans}; {hint}"))
    return TrackingDecision("refuse", message=f"MLFLOW_TRACKING_URI is {uri} (loopback) but {spans}; {hint}")


def resolve_host(uri: str) -> list[str]:
    """The addresses the URI's host name resolves to here ([] for an IP literal or a name that does not resolve)."""
    host = urlsplit(uri).hostname
    if not host:
        return []
    try:
        ipaddress.ip_address(host)
        return []
    except ValueError:
        pass
    try:
        return sorted({info[4][0] for info in socket.getaddrinfo(host, None)})
    except OSError:
        return []


# Quiet workers: Ray's info logs ("Checkpoint successfully created" per epoch) and MLflow's "View run" lines off;
# warnings, errors and every MLflow record stay.
WORKER_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_DISABLE_TELEMETRY": "true",
              "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false", "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
              "RAY_LOGGER_LEVEL": "warning"}


def start_ray(verbose: bool) -> None:
    """Join RAY_ADDRESS's cluster, or start Ray here. The job's runtime_env is shown by the dashboard: MLflow
    knobs only; the tracking URI reaches trials in the sweep context, credentials from each node's environment."""
    import ray
    ray.init(address=os.environ.get("RAY_ADDRESS"), log_to_driver=True, ignore_reinit_error=True,
             logging_level=logging.INFO if verbose else logging.WARNING,
             runtime_env={"env_vars": dict(WORKER_ENV)})


def ray_started_here() -> bool:
    """True when ray.init started a Ray of its own (the local default), False when it joined a running
    cluster: RAY_ADDRESS, `ray job submit`, or `ray submit` on a head where `ray start` runs."""
    import ray
    node = getattr(ray._private.worker.global_worker, "node", None)
    return bool(node is not None and node.is_head())


def check_tracking_reaches_nodes(user_uri: str | None, effective_uri: str) -> None:
    """Refuse (one line) a tracking URI some of Ray's nodes cannot reach (docs/design.md#10). user_uri:
    MLFLOW_TRACKING_URI as set (None: unset); effective_uri: what trials would use (the project's server)."""
    import ray
    from ich.errors import ConfigError
    nodes = [n["NodeManagerAddress"] for n in ray.nodes() if n.get("Alive")]
    decision = decide_tracking(user_uri, nodes, ray.util.get_node_ip_address(), can_grow=cluster_can_grow(len(nodes)),
                               autostarted_uri=effective_uri, host_ips=resolve_host(effective_uri))
    if decision.action == "refuse":
        raise ConfigError(decision.message)


def cluster_can_grow(alive: int) -> bool:
    """The cluster's autoscaler config allows more nodes than are alive (a cluster scaled to zero workers)."""
    import ray
    try:
        config = ray._private.state.state.get_cluster_config()
    except Exception:  # noqa: BLE001 - no autoscaler config where Ray cannot tell: judge by the nodes alone
        return False
    if config is None:
        return False
    counts = [g.max_count for g in config.node_group_configs]
    return any(c < 0 for c in counts) or sum(counts) > alive
