"""A throw-away Redis Cluster of local redis-server processes, for the cluster tests.

Three primaries, no replicas, no persistence, each in its own free port and a private directory (the nodes-P.conf
files). `cluster-require-full-coverage no` keeps the surviving shards serving once a killed node is marked failed,
which is how a cache cluster should be run: losing a shard loses a third of the cache, not all of it.
"""

from __future__ import annotations

import random
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import redis
from redis.crc import key_slot

_BUS_PORT_OFFSET = 10000  # a cluster node also listens on port + 10000 (the cluster bus)


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_cluster_ports(count: int) -> list[int]:
    """Ports P with P and P + 10000 both free. Kernel-chosen ephemeral ports (often > 55535) would put the bus
    port past 65535, so pick from 20000-29999 at random (no fixed ports: parallel runs must not collide)."""
    ports: list[int] = []
    candidates = random.sample(range(20000, 30000), 400)
    for port in candidates:
        if port not in ports and _bindable(port) and _bindable(port + _BUS_PORT_OFFSET):
            ports.append(port)
            if len(ports) == count:
                return ports
    raise RuntimeError("no free port pairs (P, P + 10000) for a Redis Cluster in 20000-29999")


def _answers(client: redis.Redis) -> bool:
    return bool(client.ping())


def _cluster_ok(client: redis.Redis) -> bool:
    return bool(client.cluster("INFO").get("cluster_state") == "ok")


class RedisClusterProcesses:
    """`num_nodes` clustered redis-server processes on 127.0.0.1; `url` names the first node (a cluster client
    finds the rest). `node_of(name)` is the index of the node that owns a key; `kill(index)` SIGKILLs one node."""

    def __init__(self, directory: Path, num_nodes: int = 3, startup_timeout_s: float = 15.0) -> None:
        server, cli = shutil.which("redis-server"), shutil.which("redis-cli")
        if server is None or cli is None:
            raise RuntimeError("redis-server / redis-cli are not on PATH: install Redis 7 to run these tests")
        self.ports = _free_cluster_ports(num_nodes)
        self.url = f"redis://127.0.0.1:{self.ports[0]}"
        self.processes: list[subprocess.Popen[bytes]] = []
        self._clients: list[redis.Redis] = []
        try:
            for port in self.ports:
                self.processes.append(self._start_node(server, directory, port))
                self._clients.append(redis.Redis(host="127.0.0.1", port=port, socket_timeout=2.0))
            deadline = time.monotonic() + startup_timeout_s
            for client in self._clients:
                self._wait(partial(_answers, client), deadline, "a cluster node did not start")
            addresses = [f"127.0.0.1:{port}" for port in self.ports]
            subprocess.run(
                [cli, "--cluster", "create", *addresses, "--cluster-replicas", "0", "--cluster-yes"],
                check=True,
                capture_output=True,
                timeout=startup_timeout_s,
            )
            for client in self._clients:
                self._wait(partial(_cluster_ok, client), deadline, "the cluster did not reach cluster_state:ok")
            self._slot_owner = self._slot_owners()
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _start_node(server: str, directory: Path, port: int) -> subprocess.Popen[bytes]:
        # redis-server runs with cwd = --dir, where it keeps nodes-P.conf; each node gets its own directory.
        node_dir = directory / f"node-{port}"
        node_dir.mkdir(parents=True, exist_ok=True)
        return subprocess.Popen(
            [
                server,
                "--port", str(port),
                "--bind", "127.0.0.1",
                "--cluster-enabled", "yes",
                "--cluster-config-file", f"nodes-{port}.conf",
                "--cluster-require-full-coverage", "no",
                "--save", "",
                "--appendonly", "no",
                "--dir", str(node_dir),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip

    def _wait(self, ready: Callable[[], bool], deadline: float, message: str) -> None:
        while True:
            try:
                if ready():
                    return
            except redis.RedisError:
                pass
            if time.monotonic() > deadline or any(p.poll() is not None for p in self.processes):
                raise RuntimeError(message)
            time.sleep(0.05)  # polling a process we do not control: there is no event to await

    def _slot_owners(self) -> dict[int, int]:
        """slot -> node index, from CLUSTER SLOTS as the first node reports it."""
        owners: dict[int, int] = {}
        for first, last, primary, *_ in self._clients[0].execute_command("CLUSTER SLOTS"):
            index = self.ports.index(int(primary[1]))
            owners.update(dict.fromkeys(range(int(first), int(last) + 1), index))
        return owners

    def node_of(self, name: str | bytes) -> int:
        """Index of the node that owns Redis key `name` (CRC16 slot, as the server computes it)."""
        return self._slot_owner[key_slot(name.encode() if isinstance(name, str) else name)]

    def client(self, index: int) -> redis.Redis:
        """A plain client of node `index` (DBSIZE, GET of keys it owns)."""
        return self._clients[index]

    def dbsize(self, index: int) -> int:
        return int(self._clients[index].dbsize())

    def kill(self, index: int) -> None:
        process = self.processes[index]
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
            process.wait(timeout=10)

    def close(self) -> None:
        for index in range(len(self.processes)):
            self.kill(index)
        for client in self._clients:
            client.close()
