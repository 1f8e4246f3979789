"""RedisEmbeddingCache on a real 3-node Redis Cluster (`--redis-cluster`): keys spread over every node, verification
and compare-and-delete work per slot, a killed node costs only its own keys (misses within the time box), an
unreachable cluster is a counted miss, and the encoder service shares records through the cluster."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import pytest
import torch

from common.config import CacheConfig
from common.embedding_record import EmbeddingRecord, encode_record
from common.hashing import redis_key
from common.images.cache import CacheUnavailableError, RedisEmbeddingCache
from common.images.embedding import ImageEmbedding
from tests.encoder.support import RunningServer, encoder_config, free_port, png_bytes
from tests.redis_cluster import RedisClusterProcesses

FINGERPRINT = "c" * 64
NUM_KEYS = 48  # P(some node of 3 gets none of 48 random keys) ~ 3 * (2/3)^48 ~ 1e-8


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterProcesses]:
    """One cluster for the module's tests that leave it intact."""
    processes = RedisClusterProcesses(tmp_path_factory.mktemp("redis-cluster"))
    yield processes
    processes.close()


@pytest.fixture
def doomed_cluster(tmp_path: Path) -> Iterator[RedisClusterProcesses]:
    """A cluster of its own for a test that kills one of its nodes."""
    processes = RedisClusterProcesses(tmp_path)
    yield processes
    processes.close()


class Counters:
    def __init__(self) -> None:
        self.errors: list[str] = []
        self.poisoned = 0

    def on_error(self, op: str) -> None:
        self.errors.append(op)

    def on_poisoned(self) -> None:
        self.poisoned += 1


def cluster_cache(url: str, counters: Counters, *, timeout_ms: float = 5000, failures: int = 5) -> RedisEmbeddingCache:
    """A cache on the cluster. The default time box is generous: a new client's first call also loads the cluster's
    topology, which on a loaded CI machine took longer than 500 ms; the tests of the time box pass their own."""
    config = CacheConfig(
        redis_url=url, redis_cluster=True, redis_timeout_ms=timeout_ms, breaker_failures=failures, breaker_cooldown_s=60
    )
    return RedisEmbeddingCache.from_config(
        config, FINGERPRINT, on_error=counters.on_error, on_poisoned=counters.on_poisoned
    )


def embedding(seed: int) -> ImageEmbedding:
    return ImageEmbedding(torch.randn(3, 4, generator=torch.Generator().manual_seed(seed)), layout=(1, 3))


def keys_by_node(cluster: RedisClusterProcesses, keys: list[str]) -> dict[int, list[str]]:
    owners: dict[int, list[str]] = {}
    for key in keys:
        owners.setdefault(cluster.node_of(redis_key(key)), []).append(key)
    return owners


def command_table_fetches(cluster: RedisClusterProcesses, nodes: tuple[int, ...]) -> int:
    """How many COMMAND (the full command table) the given nodes have served."""
    stats = [cluster.client(node).info("commandstats").get("cmdstat_command", {"calls": 0}) for node in nodes]
    return sum(int(stat["calls"]) for stat in stats)


def test_round_trip_spreads_records_over_every_node(cluster: RedisClusterProcesses) -> None:
    keys = [secrets.token_hex(32) for _ in range(NUM_KEYS)]
    counters = Counters()
    sizes_before = [cluster.dbsize(node) for node in range(3)]

    async def scenario() -> list[ImageEmbedding | None]:
        cache = cluster_cache(cluster.url, counters)
        try:
            for seed, key in enumerate(keys):
                await cache.put(key, embedding(seed))
            return [await cache.get(key) for key in keys]
        finally:
            await cache.close()

    found = asyncio.run(scenario())
    for seed, result in enumerate(found):
        assert result is not None and torch.equal(result.tensor, embedding(seed).tensor)
        assert result.layout == (1, 3)
    owners = keys_by_node(cluster, keys)
    assert sorted(owners) == [0, 1, 2]  # every node owns some of the keys...
    for node, owned in owners.items():  # ...and holds exactly those records: the client routed by slot
        assert all(cluster.client(node).exists(redis_key(key)) == 1 for key in owned)
        assert cluster.dbsize(node) == sizes_before[node] + len(owned)
    assert counters.errors == []


@pytest.mark.parametrize("kind", ["wrong_fingerprint", "another_key", "truncated"])
def test_poisoned_records_are_misses_and_deleted_on_their_node(kind: str, cluster: RedisClusterProcesses) -> None:
    key = secrets.token_hex(32)
    name = redis_key(key)
    data = torch.ones(3, 4).numpy().tobytes()
    records = {
        "wrong_fingerprint": EmbeddingRecord("float32", (3, 4), "e" * 64, key, data),
        "another_key": EmbeddingRecord("float32", (3, 4), FINGERPRINT, "d" * 64, data),
        "truncated": EmbeddingRecord("float32", (3, 4), FINGERPRINT, key, data),
    }
    poison = encode_record(records[kind])[: -8 if kind == "truncated" else None]
    owner = cluster.client(cluster.node_of(name))
    owner.set(name, poison)
    counters = Counters()

    async def scenario() -> ImageEmbedding | None:
        cache = cluster_cache(cluster.url, counters)
        try:
            return await cache.get(key)
        finally:
            await cache.close()

    assert asyncio.run(scenario()) is None
    assert counters.poisoned == 1
    assert owner.exists(name) == 0  # the compare-and-delete script ran on the owning node
    assert counters.errors == []


def test_killed_node_costs_only_its_own_keys(doomed_cluster: RedisClusterProcesses) -> None:
    """SIGKILL one node: its keys are misses (counted errors) within the time box, every other key still hits,
    puts never raise, and no later call is slowed past the box by the dead node."""
    timeout_s = 0.2
    keys = [secrets.token_hex(32) for _ in range(NUM_KEYS)]
    owners = keys_by_node(doomed_cluster, keys)
    dead, live = 1, (0, 2)
    counters = Counters()

    async def scenario() -> tuple[dict[str, str], list[float], list[ImageEmbedding | None]]:
        # A breaker that never opens here, so every call really goes to the cluster.
        cache = cluster_cache(doomed_cluster.url, counters, timeout_ms=timeout_s * 1000, failures=10_000)
        try:
            for seed, key in enumerate(keys):
                await cache.put(key, embedding(seed))
            command_calls_before = command_table_fetches(doomed_cluster, live)
            doomed_cluster.kill(dead)
            outcomes: dict[str, str] = {}
            elapsed: list[float] = []
            for key in keys + keys:  # twice: the second pass runs on the topology reloaded after the failures
                start = time.monotonic()
                try:
                    outcomes[key] = "hit" if await cache.get(key) is not None else "miss"
                except CacheUnavailableError:
                    outcomes[key] = "unavailable"
                elapsed.append(time.monotonic() - start)
            fresh = [secrets.token_hex(32) for _ in range(NUM_KEYS)]
            for seed, key in enumerate(fresh):
                await cache.put(key, embedding(seed))  # must not raise, dead node or not
            live_fresh = [key for key in fresh if doomed_cluster.node_of(redis_key(key)) != dead]
            found = [await cache.get(key) for key in live_fresh]
            # redis-py reloads the topology after each failure; the ~80 ms COMMAND table must not come with it.
            assert command_table_fetches(doomed_cluster, live) == command_calls_before
            with contextlib.suppress(CacheUnavailableError):
                await cache.get(owners[dead][0])  # close right after a node error (a topology reload pending)
            return outcomes, elapsed, found
        finally:
            await cache.close()

    outcomes, elapsed, fresh_found = asyncio.run(scenario())
    assert {outcomes[key] for key in owners[dead]} == {"unavailable"}
    assert {outcomes[key] for node in live for key in owners[node]} == {"hit"}
    assert max(elapsed) < timeout_s + 0.1, f"slowest get {max(elapsed):.3f} s"  # 0.1 s: event loop scheduling
    assert fresh_found and all(found is not None for found in fresh_found)
    assert counters.errors.count("get") == 2 * len(owners[dead]) + 1
    assert counters.errors.count("set") >= 1  # the fresh puts that landed on the dead node
    for node in live:  # close() left no connection open: the nodes see only the test's own client
        wait_until(partial(has_one_client, doomed_cluster, node), "close() left a connection open")


def has_one_client(cluster: RedisClusterProcesses, node: int) -> bool:
    return len(cluster.client(node).client_list()) == 1


def wait_until(condition: Callable[[], bool], message: str, timeout_s: float = 5.0) -> None:
    """Poll a server-side state (a closed socket is seen by the server a moment later): no event to await."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, message
        time.sleep(0.01)


def test_unreachable_cluster_is_a_counted_miss() -> None:
    """No node answers: the topology load fails (RedisClusterException, not a RedisError) and must still be a
    CacheUnavailableError for get and nothing for put."""
    counters = Counters()

    async def scenario() -> None:
        cache = cluster_cache(f"redis://127.0.0.1:{free_port()}", counters, timeout_ms=200, failures=10)
        try:
            with pytest.raises(CacheUnavailableError):
                await cache.get(secrets.token_hex(32))
            await cache.put(secrets.token_hex(32), embedding(0))
        finally:
            await cache.close()

    asyncio.run(scenario())
    assert counters.errors == ["get", "set"]


def test_encoder_replicas_share_records_through_the_cluster(
    tiny_checkpoint: Path, cluster: RedisClusterProcesses
) -> None:
    cache = CacheConfig(redis_url=cluster.url, redis_cluster=True, redis_timeout_ms=5000)  # generous: see cluster_cache
    config = encoder_config(tiny_checkpoint, cache=cache)
    first = RunningServer(config)
    try:
        second = RunningServer(config)
        try:
            data = png_bytes()
            (miss,) = first.encode(data).images
            (hit,) = first.encode(data).images
            (other,) = second.encode(data).images  # another replica: found in the cluster
            assert (miss.cache_hit, hit.cache_hit, other.cache_hit) == (False, True, True)
            assert miss.embedding == hit.embedding == other.embedding
            name = redis_key(miss.embedding_key)
            assert cluster.client(cluster.node_of(name)).exists(name) == 1
        finally:
            second.close()
    finally:
        first.close()


class DelayingProxy:
    """A TCP proxy in front of one node that holds every reply `delay_s` before passing it on: a slow link."""

    def __init__(self, port: int, delay_s: float) -> None:
        self._port, self._delay_s = port, delay_s
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._connect, "127.0.0.1", 0)
        return f"redis://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def _connect(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        node_reader, node_writer = await asyncio.open_connection("127.0.0.1", self._port)
        for task in (
            self._pipe(client_reader, node_writer, 0.0),
            self._pipe(node_reader, client_writer, self._delay_s),
        ):
            self._tasks.add(asyncio.create_task(task))

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay_s: float) -> None:
        with contextlib.suppress(OSError):
            while chunk := await reader.read(65536):
                await asyncio.sleep(delay_s)  # the injected latency, not a synchronisation
                writer.write(chunk)
                await writer.drain()
        writer.close()

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


def test_topology_load_outlives_time_boxes_shorter_than_it(cluster: RedisClusterProcesses) -> None:
    """The startup node answers CLUSTER SLOTS in 60 ms, the box is 20 ms. Cancelled with each call, the topology
    load would start over forever; it must go on in the background so that a later call hits."""
    key = secrets.token_hex(32)
    counters = Counters()

    async def scenario() -> int:
        writer = cluster_cache(cluster.url, Counters())
        await writer.put(key, embedding(7))
        await writer.close()
        proxy = DelayingProxy(cluster.ports[0], delay_s=0.06)
        cache = cluster_cache(await proxy.start(), counters, timeout_ms=20, failures=10_000)
        try:
            deadline = time.monotonic() + 10
            calls = 0
            while time.monotonic() < deadline:  # each call is bounded by its own 20 ms box
                calls += 1
                with contextlib.suppress(CacheUnavailableError):
                    if await cache.get(key) is not None:
                        return calls
            return 0
        finally:
            await cache.close()
            await proxy.close()

    calls = asyncio.run(scenario())
    assert calls > 1, "no get hit within 10 s: the topology load never finished"
    assert counters.errors == ["get"] * (calls - 1)  # the calls that ran out of time while it loaded were counted
