"""A TCP proxy the fault tests put between a service and a real dependency (redis-server), to make the network
misbehave on demand: pass everything through, swallow everything (a blackhole), delay every chunk, or drop every
open connection at once.

    service ──▶ 127.0.0.1:proxy.port ──▶ 127.0.0.1:upstream_port (a real redis-server)

Threaded (one thread per direction per connection), so it works whatever event loop the service runs on. The
mode applies to every chunk read from then on, in both directions, on old and new connections alike.
"""

from __future__ import annotations

import contextlib
import enum
import select
import socket
import threading
from types import TracebackType

_CHUNK_BYTES = 65536
_POLL_S = 0.05  # how often a pump thread looks at the stop flag while its socket is quiet


class ProxyMode(enum.Enum):
    PASS_THROUGH = "pass_through"
    BLACKHOLE = "blackhole"  # connections are accepted and read, nothing is forwarded or answered
    SLOW = "slow"  # every chunk is forwarded `slow_delay_s` late (order kept)


class TcpProxy:
    """Listens on a free loopback port and forwards to `upstream_port`; `close()` (or the `with` block) stops it."""

    def __init__(self, upstream_port: int, *, slow_delay_s: float = 2.0, host: str = "127.0.0.1") -> None:
        self.upstream = (host, upstream_port)
        self.slow_delay_s = slow_delay_s
        self.mode = ProxyMode.PASS_THROUGH
        self._stopped = threading.Event()
        self._lock = threading.Lock()
        self._connections: set[_Connection] = set()
        self._listener = socket.create_server((host, 0))
        self.port: int = self._listener.getsockname()[1]
        self._accept_thread = threading.Thread(target=self._accept, name="tcp-proxy-accept", daemon=True)
        self._accept_thread.start()

    @property
    def num_connections(self) -> int:
        with self._lock:
            return len(self._connections)

    def set_mode(self, mode: ProxyMode) -> None:
        self.mode = mode

    def close_all(self) -> None:
        """Drop every open connection (both sides see the socket close); new ones are accepted as before."""
        with self._lock:
            connections = list(self._connections)
        for connection in connections:
            connection.close()

    def close(self) -> None:
        self._stopped.set()
        self._accept_thread.join(timeout=5)
        self._listener.close()
        self.close_all()

    def __enter__(self) -> TcpProxy:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()

    def _accept(self) -> None:
        while not self._stopped.is_set():
            try:
                readable, _, _ = select.select([self._listener], [], [], _POLL_S)  # accept() alone would not wake
                if not readable:  # when close() closes the listener
                    continue
                client, _ = self._listener.accept()
            except (OSError, ValueError):  # the listener was closed by close()
                return
            try:
                upstream = socket.create_connection(self.upstream, timeout=2)
            except OSError:  # the dependency is down: the client sees its connection closed, as it would directly
                client.close()
                continue
            connection = _Connection(self, client, upstream)
            with self._lock:
                self._connections.add(connection)
            connection.start()

    def _forget(self, connection: _Connection) -> None:
        with self._lock:
            self._connections.discard(connection)


class _Connection:
    """One proxied connection: two pump threads; either side closing closes both."""

    def __init__(self, proxy: TcpProxy, client: socket.socket, upstream: socket.socket) -> None:
        self._proxy = proxy
        self._client = client
        self._upstream = upstream
        self._closed = threading.Event()
        self._threads = [
            threading.Thread(target=self._pump, args=(client, upstream), name="tcp-proxy-up", daemon=True),
            threading.Thread(target=self._pump, args=(upstream, client), name="tcp-proxy-down", daemon=True),
        ]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        for sock in (self._client, self._upstream):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)  # wakes the peer (and our own pump) at once
            sock.close()
        self._proxy._forget(self)

    def _pump(self, source: socket.socket, target: socket.socket) -> None:
        try:
            while not self._closed.is_set():
                readable, _, _ = select.select([source], [], [], _POLL_S)
                if not readable:
                    continue
                chunk = source.recv(_CHUNK_BYTES)
                if not chunk:
                    break  # that side closed
                mode = self._proxy.mode
                if mode is ProxyMode.BLACKHOLE:
                    continue
                if mode is ProxyMode.SLOW and self._closed.wait(self._proxy.slow_delay_s):
                    break  # closed while the chunk was held back
                target.sendall(chunk)
        except (OSError, ValueError):  # a socket closed under us (ValueError: select on a closed fd)
            pass
        self.close()
