"""The router's handles on replicas: a local replica process it spawned, or a remote one that connected.

Both are a `Link`: one multiprocessing Connection (a pipe locally, authenticated TCP across hosts: the same
send/recv of the same typed messages, serve/replica.py), a writer thread (a stopped replica never blocks
the router) and a reader thread that hands every message to `on_message(link, msg)`, ending with
`Exited` when the connection closes. A local replica is killed whole (rank 0 and the ranks it spawned);
a remote one can only be disconnected, which makes it exit (its launcher, e.g. torchrun, restarts it).
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import queue
import random
import signal
import socket
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection, Listener, answer_challenge, deliver_challenge
from typing import Any

from meshlm.engine.executor import kill_ranks
from meshlm.errors import MeshlmError
from meshlm.serve.cli import KEY_ENV
from meshlm.serve.replica import Exited, Ready, ReplicaSpec, replica_main

log = logging.getLogger(__name__)
USER_TIMEOUT_MS = 5000  # TCP_USER_TIMEOUT of remote links: heartbeats flow every 0.1 s, so this only bites a dead link


class Link:
    """One replica's connection, its reader and writer threads."""

    remote = False

    def __init__(self, name: str, on_message: Callable[[Link, Any], None]) -> None:
        self.name, self.on_message = name, on_message
        self.conn: Connection | None = None
        self.pid: int | None = None
        self.host = ""
        self.rank_pids: tuple[int, ...] = ()
        self._out: queue.Queue = queue.Queue()

    def _run(self) -> None:
        self._threads = [threading.Thread(target=self._write, name=f"{self.name}-writer", daemon=True),
                         threading.Thread(target=self._read, name=f"{self.name}-reader", daemon=True)]
        for t in self._threads:
            t.start()

    def send(self, msg: Any) -> None:
        """Queue a message for the replica (returns at once); None asks it to stop."""
        self._out.put(msg)

    def _write(self) -> None:
        while True:
            msg = self._out.get()
            try:
                self.conn.send(msg)
            except (OSError, ValueError):
                return
            if msg is None:
                return

    def _read(self) -> None:
        while True:
            try:
                msg = self.conn.recv()
            except (EOFError, OSError, ValueError):
                self.on_message(self, Exited(self._exitcode()))
                return
            if isinstance(msg, Ready):
                self.rank_pids, self.pid, self.host = msg.rank_pids, msg.pid or self.pid, msg.host
            self.on_message(self, msg)

    def _exitcode(self) -> int | None:
        return None

    def _close(self) -> None:
        self._out.put(None)
        try:
            self.conn.close()
        except OSError:
            pass

    def wait(self, timeout: float) -> None:
        """Wait up to timeout for the replica, asked to stop, to close its end (it has sent everything)."""
        deadline = time.monotonic() + timeout
        for t in getattr(self, "_threads", ()):
            t.join(max(0.0, deadline - time.monotonic()))

    def kill(self) -> None:
        """End the replica: kill it whole (local) or drop its connection (remote)."""
        self._close()


class LocalReplica(Link):
    """A replica process spawned on this host; its ranks die with it."""

    def __init__(self, spec: ReplicaSpec, name: str, on_message: Callable[[Link, Any], None]) -> None:
        super().__init__(name, on_message)
        ctx = mp.get_context("spawn")
        self.conn, self._child = ctx.Pipe()
        self.proc = ctx.Process(target=replica_main, args=(self._child, spec), name=name)

    def start(self) -> None:
        """Start the process and its threads (blocks while the interpreter is spawned: not on the event loop)."""
        self.proc.start()
        self._child.close()
        self.pid = self.proc.pid
        self._run()

    def _exitcode(self) -> int | None:
        self.proc.join(1.0)
        return self.proc.exitcode

    def wait(self, timeout: float) -> None:
        """Wait up to timeout for the process to exit."""
        if self.proc.pid is not None:
            self.proc.join(timeout)
            super().wait(1.0)

    def kill(self) -> None:
        """SIGKILL rank 0 and every rank it spawned (a stopped one too), reap them, remove their shm segments."""
        if self.proc.pid is None:
            return
        try:
            os.kill(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.join(5.0)
        kill_ranks([self.proc.pid, *self.rank_pids])
        self._close()


class RemoteReplica(Link):
    """A replica on another host (`meshlm serve --join HOST:PORT`) that connected to the router."""

    remote = True

    def __init__(self, conn: Connection, name: str, on_message: Callable[[Link, Any], None]) -> None:
        super().__init__(name, on_message)
        self.conn = conn
        self._run()

    def kill(self) -> None:
        """Drop the connection (shut down first: it wakes this side's threads blocked on a cut link)."""
        _socket_op(self.conn, lambda s: s.shutdown(socket.SHUT_RDWR))
        self._close()


def _socket_op(conn: Connection, op: Callable[[socket.socket], None]) -> None:
    """Apply op to the TCP socket under conn (a duplicate of its fd; best effort)."""
    try:
        sock = socket.socket(fileno=os.dup(conn.fileno()))
    except (OSError, ValueError):
        return
    try:
        op(sock)
    except OSError:
        pass
    finally:
        sock.close()


def _bounded(conn: Connection) -> Connection:
    """Data unacknowledged for USER_TIMEOUT_MS breaks the connection (a cut link errors, never hangs)."""
    _socket_op(conn, lambda s: s.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, USER_TIMEOUT_MS))
    return conn


class ReplicaListener:
    """Accepts remote replicas' connections (authenticated) and hands each to `on_connect`."""

    def __init__(self, address: tuple[str, int], key: bytes, on_connect: Callable[[Connection], None]) -> None:
        self.listener = Listener(address, authkey=key)
        self.on_connect = on_connect
        threading.Thread(target=self._accept, name="meshlm-replica-listener", daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn = self.listener.accept()
            except (mp.AuthenticationError, EOFError, ConnectionError) as e:
                log.warning("a replica connection was refused: %s", e)
                continue
            except OSError:
                return  # closed
            self.on_connect(_bounded(conn))

    def close(self) -> None:
        """Stop accepting."""
        self.listener.close()


class RouterUnreachable(MeshlmError):
    """`serve --join`: the router could not be reached before the deadline, or it refused this replica's key."""


def connect(address: tuple[str, int], key: bytes, timeout_s: float = 60.0) -> Connection:
    """A remote replica's connection to the router, tried again with jittered backoff (0.5 s doubling to 5 s)
    while the router is not up yet, for up to timeout_s seconds; then RouterUnreachable naming the address."""
    host, port = address
    deadline, pause, attempt = time.monotonic() + timeout_s, 0.5, 0
    while True:
        attempt += 1
        try:
            return _bounded(_client(address, key, max(0.1, min(10.0, deadline - time.monotonic()))))
        except mp.AuthenticationError as e:
            raise RouterUnreachable(f"The router at {host}:{port} refused this replica ({e}): export the same "
                                    f"{KEY_ENV} value on the router and on this host.") from None
        except (OSError, EOFError) as e:  # refused, unreachable, unresolved, timed out, or closed mid-handshake
            why = str(e) or type(e).__name__
            left = deadline - time.monotonic()
            if left <= 0:
                raise RouterUnreachable(
                    f"Could not reach the router at {host}:{port} in {timeout_s:g} s ({attempt} attempts; last: "
                    f"{why}). Start the router first (`meshlm serve --dp N --remote-replicas K --replica-listen "
                    f"{host}:{port}`), check that this host can reach that address (firewall, --replica-listen "
                    "bound to a public interface), or wait longer with --join-timeout SECONDS.") from None
            wait = min(left, pause * random.uniform(0.8, 1.2))
            log.warning("router at %s:%d not reachable (attempt %d: %s); retrying in %.1f s (%.0f s left)",
                        host, port, attempt, why, wait, left)
            time.sleep(wait)
            pause = min(5.0, 2 * pause)


def _client(address: tuple[str, int], key: bytes, connect_s: float) -> Connection:
    """multiprocessing.connection.Client over TCP, with the TCP connect bounded by connect_s (a dropped SYN
    otherwise blocks for minutes); the connection itself blocks, as Client's does."""
    sock = socket.create_connection(address, timeout=connect_s)
    sock.setblocking(True)
    conn = Connection(sock.detach())
    try:
        answer_challenge(conn, key)
        deliver_challenge(conn, key)
    except BaseException:
        conn.close()
        raise
    return conn
