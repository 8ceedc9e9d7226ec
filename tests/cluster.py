"""Real Redis processes for tests: a standalone ``redis-server`` and a local Redis Cluster.

Every process is started on free ports in a directory of the test's own and stopped by its pid
(never by name). :class:`LocalCluster` is 3 primaries + 3 replicas made by
``redis-cli --cluster create``, with a 1 s node timeout so a killed primary's replica is
promoted within ~2-3 s, and ``cluster-require-full-coverage no`` so the other primaries keep
answering meanwhile.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import redis

from tests.conftest import _need

NODE_TIMEOUT_MS = 1000


def redis_binaries() -> tuple[str, str]:
    """(redis-server, redis-cli); fails in CI and skips elsewhere when they are missing."""
    server, cli = shutil.which("redis-server"), shutil.which("redis-cli")
    if not (server and cli):
        _need("redis-server/redis-cli not installed")
    return server, cli


def free_node_port() -> int:
    """A port free for a node and for its cluster bus (port + 10000)."""
    for port in np.random.default_rng().integers(20000, 30000, 100):
        try:
            for p in (int(port), int(port) + 10000):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
        except OSError:
            continue
        return int(port)
    raise RuntimeError("no free port pair for a Redis node")


def wait_for(ready: Callable[[], bool], timeout_s: float = 15.0, what: str = "redis") -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if ready():
                return
        except (redis.RedisError, OSError):
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not ready after {timeout_s} s")
        time.sleep(0.05)


class RedisNode:
    """One ``redis-server`` process (standalone, or a cluster node with ``cluster=True``)."""

    def __init__(self, root: Path, port: int | None = None, cluster: bool = False):
        self.port = port or free_node_port()
        self.dir = root / f"node-{self.port}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.cluster = cluster
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisNode:
        server, _ = redis_binaries()
        args = [server, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
                "--save", "", "--appendonly", "no"]
        if self.cluster:
            # No 5 s wait before a replica's first sync: a replica must be in sync to take over.
            # Partial coverage, as docs/scaling.md advises: a dead primary stops only its own slots.
            args += ["--cluster-enabled", "yes", "--cluster-config-file", str(self.dir / "nodes.conf"),
                     "--cluster-node-timeout", str(NODE_TIMEOUT_MS), "--repl-diskless-sync-delay", "0",
                     "--cluster-require-full-coverage", "no"]
        self.proc = subprocess.Popen(
            [*args, "--logfile", str(self.dir / "redis.log")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        wait_for(lambda: self.client().ping(), what=f"redis-server on {self.port}")
        return self

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_connect_timeout=1, socket_timeout=2)

    def info(self, section: str) -> dict:
        c = self.client()
        try:
            return c.info(section)
        finally:
            c.close()

    def mget_calls(self) -> int:
        """MGET commands this node has executed (``INFO commandstats``)."""
        return int(self.info("commandstats").get("cmdstat_mget", {}).get("calls", 0))

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL by pid: as a crashed machine, no shutdown, no goodbye to the cluster."""
        if self.alive:
            self.proc.kill()
            self.proc.wait()

    def stop(self) -> None:
        if self.alive:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class LocalCluster:
    """``primaries`` primaries with one replica each, on free local ports under ``root``."""

    def __init__(self, root: Path, primaries: int = 3):
        self.root = root
        self.nodes = [RedisNode(root, cluster=True) for _ in range(2 * primaries)]

    @property
    def url(self) -> str:
        return f"redis+cluster://127.0.0.1:{self.nodes[0].port}"

    def start(self) -> LocalCluster:
        _, cli = redis_binaries()
        try:
            for node in self.nodes:
                node.start()
            subprocess.run(
                [cli, "--cluster", "create", *(f"127.0.0.1:{n.port}" for n in self.nodes),
                 "--cluster-replicas", "1", "--cluster-yes"],
                check=True, capture_output=True, timeout=60,
            )
            self.wait_healthy()
        except BaseException:
            self.stop()
            raise
        return self

    def node(self, port: int) -> RedisNode:
        return next(n for n in self.nodes if n.port == port)

    def live(self) -> list[RedisNode]:
        return [n for n in self.nodes if n.alive]

    def topology(self) -> dict[str, dict]:
        """``CLUSTER NODES`` as seen by a live node: node id → {port, primary, failed, slots};
        ``failed`` also for a node this object killed whose failure the cluster has not agreed on yet."""
        c = self.live()[0].client()
        try:
            parsed = c.cluster("nodes")
        finally:
            c.close()
        nodes = {}
        for address, n in parsed.items():
            flags = n["flags"].split(",")
            port = int(address.split("@")[0].rsplit(":", 1)[1])
            slots = [s for a, *b in n["slots"] for s in range(int(a), int(b[0] if b else a) + 1)]
            nodes[n["node_id"]] = {
                "port": port,
                "primary": "master" in flags,
                "failed": "fail" in flags or "fail?" in flags or not self.node(port).alive,
                "slots": slots,
            }
        return nodes

    def owner(self, slot: int) -> tuple[str, int]:
        """(node id, port) of the primary serving ``slot``."""
        for node_id, n in self.topology().items():
            if n["primary"] and not n["failed"] and slot in n["slots"]:
                return node_id, n["port"]
        raise LookupError(f"slot {slot} is not served")

    def primaries(self) -> list[RedisNode]:
        ports = {n["port"] for n in self.topology().values() if n["primary"] and not n["failed"]}
        return [n for n in self.nodes if n.port in ports and n.alive]

    def wait_healthy(self, timeout_s: float = 30.0) -> None:
        """Every live node says ``cluster_state:ok``, every slot has a live primary, and every
        live replica is in sync with its primary."""
        def ok() -> bool:
            for node in self.live():
                c = node.client()
                try:
                    if c.cluster("info")["cluster_state"] != "ok":
                        return False
                finally:
                    c.close()
                replication = node.info("replication")
                if replication["role"] == "slave" and replication.get("master_link_status") != "up":
                    return False
            topo = self.topology()
            served = sum(len(n["slots"]) for n in topo.values() if n["primary"] and not n["failed"])
            return served == 16384

        wait_for(ok, timeout_s, "redis cluster")

    def reshard(self, slot: int, to_port: int, timeout_s: float = 120.0) -> subprocess.CompletedProcess:
        """``redis-cli --cluster reshard`` moving ``slot``'s primary's lowest slots up to ``slot``
        (redis-cli moves a source's lowest slots first) to the primary on ``to_port``."""
        _, cli = redis_binaries()
        topo = self.topology()
        src_id, src_port = self.owner(slot)
        dst_id = next(i for i, n in topo.items() if n["port"] == to_port)
        count = sorted(topo[src_id]["slots"]).index(slot) + 1
        return subprocess.run(
            [cli, "--cluster", "reshard", f"127.0.0.1:{src_port}", "--cluster-from", src_id,
             "--cluster-to", dst_id, "--cluster-slots", str(count), "--cluster-yes"],
            check=True, capture_output=True, text=True, timeout=timeout_s,
        )

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
