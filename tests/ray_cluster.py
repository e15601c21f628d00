"""A real local two-node Ray cluster for the tests (``ray.cluster_utils.Cluster``), stopped afterwards with a
check that no Ray process is left behind."""

from __future__ import annotations

import os
import socket
from contextlib import contextmanager


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _processes(node) -> list:
    return [p.process for procs in node.all_processes.values() for p in procs if p.process is not None]


@contextmanager
def two_node_cluster(client_server: bool = False):
    """One head and one worker node, one CPU each, connected in this process. With ``client_server`` the head
    also runs a Ray Client server (``cluster.client_port``; None when grpcio is missing)."""
    import ray
    from ray._private.utils import get_ray_client_dependency_error
    from ray.cluster_utils import Cluster

    port = _free_port() if client_server and get_ray_client_dependency_error() is None else None
    if port:  # the head's proxier waits this long for a client's server process (default 30 s: short on 2 busy cores)
        os.environ.setdefault("RAY_CLIENT_SERVER_CHECK_CHANNEL_TIMEOUT_S", "180")
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, **({"ray_client_server_port": port}
                                                                         if port else {})})
    c.add_node(num_cpus=1)
    c.wait_for_nodes()
    c.client_port = port
    ray.init(address=c.address)
    procs = []
    try:
        yield c
    finally:
        procs = [p for n in [c.head_node, *c.worker_nodes] for p in _processes(n)]
        ray.shutdown()
        c.shutdown()
    left = [p.pid for p in procs if p.poll() is None]
    assert not left, f"Ray processes left behind: {left}"
