"""A local Ray instance that fsmeta starts listens on 127.0.0.1 only (issue 16, defect 7)."""

from __future__ import annotations

import ipaddress

import psutil

from fsmeta.config import load_config


def _listening(pids: set[int]) -> set[tuple[str, str]]:
    found = set()
    for conn in psutil.net_connections("inet"):
        if conn.status == psutil.CONN_LISTEN and conn.pid in pids:
            try:
                name = psutil.Process(conn.pid).name()
            except psutil.NoSuchProcess:
                continue
            found.add((conn.laddr.ip, name))
    return found


def _loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip.split("%")[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.is_loopback


def test_a_local_instance_binds_every_service_to_loopback(ray_session):
    import ray

    from fsmeta.meta.driver import connect

    if ray.is_initialized():
        ray.shutdown()  # the session's instance was started by the test fixture, not by fsmeta
    try:
        assert connect(load_config(None, ["ray.num_cpus=1"])) is True

        @ray.remote(num_cpus=1)
        def worker_pid() -> int:
            import os

            return os.getpid()

        ray.get(worker_pid.remote())  # a worker process exists and listens too
        me = psutil.Process()
        pids = {me.pid} | {p.pid for p in me.children(recursive=True)}
        found = _listening(pids)
        names = {n for _, n in found}
        assert any("gcs_server" in n for n in names) and any("raylet" in n for n in names), found
        exposed = sorted((ip, n) for ip, n in found if not _loopback(ip))
        assert not exposed, f"listening beyond loopback: {exposed}"
        assert ray.util.get_node_ip_address() == "127.0.0.1"
    finally:
        ray.shutdown()
    from ray._private import ray_constants

    assert ray_constants.ENABLE_RAY_CLUSTER is True  # restored: a later connect to a cluster finds the real address
