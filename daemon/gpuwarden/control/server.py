"""The control socket: JSON-RPC 2.0 over newline-delimited JSON on a Unix socket.

Safety properties, each with the reason:
- The socket is born 0660 (bound under umask 0117, never chmod-ed afterwards), so there is no
  window in which a wider mode exists; its group is set to daemon.socket_group by chown.
- A stale socket left by a dead daemon is replaced only because we hold the daemon lock
  (the supervisor takes it before any service starts), and only if nothing answers there.
- Peer credentials (SO_PEERCRED) are checked on accept, before a byte is read: root, our own
  uid, daemon.allowed_uids and members of socket_group pass; everyone else is closed and
  logged (`control_refused`).
- Each connection runs in its own task with bounded reads (MAX_REQUEST per line) and a
  per-request timeout; an exception in a method becomes an error reply, never a crash.
- `events.subscribe` feeds a bounded per-client queue from `store.subscribe`; a client too
  slow to keep up loses events and is told so (an event named `lagged`), never stalls others.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import itertools
import os
import pwd
import socket
import stat
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import structlog
from pydantic import ValidationError
from pydantic_core import to_jsonable_python

from gpuwarden.config.settings import DaemonSettings
from gpuwarden.control import rpc
from gpuwarden.control.events import event_json, lagged_json
from gpuwarden.control.methods import METHODS, Caller, Method, NoParams
from gpuwarden.control.throttle import LogThrottle
from gpuwarden.core.errors import DomainError
from gpuwarden.core.heartbeat import BEAT_EVERY
from gpuwarden.core.model import Event
from gpuwarden.fleet.app import App
from gpuwarden.store import IllegalTransition, NotFoundError

log = structlog.get_logger(__name__)

SOCKET_UMASK = 0o117  # socket born rw for owner and group: 0660
EVENT_QUEUE = 1000  # events buffered per subscriber before it counts as lagging
# Each connection holds a descriptor: a cap keeps a client that opens many (or forgets to
# close them) from taking the daemon's, and an idle connection is closed after a while. A
# subscriber to events is idle by design and is not timed out.
MAX_CONNECTIONS = 64
IDLE_TIMEOUT = 300.0  # seconds
_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


# --- who may connect ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Peer:
    pid: int
    uid: int
    gid: int
    groups: frozenset[int] = frozenset()


@dataclass(frozen=True, slots=True)
class AccessRules:
    daemon_uid: int
    allowed_uids: frozenset[int] = frozenset()
    group_gid: int | None = None

    @classmethod
    def from_settings(
        cls,
        settings: DaemonSettings,
        *,
        daemon_uid: int,
        lookup_group: Callable[[str], int] = lambda name: grp.getgrnam(name).gr_gid,
    ) -> AccessRules:
        gid = None
        if settings.socket_group:
            try:
                gid = lookup_group(settings.socket_group)
            except KeyError:
                log.warning("control_group_unknown", group=settings.socket_group)
        return cls(daemon_uid, frozenset(settings.allowed_uids), gid)

    def allows(self, uid: int, gid: int, groups: frozenset[int]) -> bool:
        """Pure: may a process with these credentials use the socket?"""
        if uid in (0, self.daemon_uid) or uid in self.allowed_uids:
            return True
        return self.group_gid is not None and (gid == self.group_gid or self.group_gid in groups)


def peer_of(conn: socket.socket) -> Peer:
    """The credentials the kernel recorded when the peer connected."""
    pid, uid, gid = _PEERCRED.unpack(
        conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
    )
    return Peer(pid, uid, gid, peer_groups(pid, uid))


def peer_groups(pid: int, uid: int) -> frozenset[int]:
    """The peer's supplementary groups from /proc/<pid>/status; if that is unreadable (the
    peer lives in another pid namespace), the groups that list its user name."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("Groups:"):
                return frozenset(int(g) for g in line.split()[1:])
    except (OSError, ValueError):
        pass
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        return frozenset()
    return frozenset(g.gr_gid for g in grp.getgrall() if name in g.gr_mem)


# --- the socket file ------------------------------------------------------------------------


class SocketInUse(RuntimeError):
    pass


def bind_socket(path: Path, group_gid: int | None) -> socket.socket:
    """Create the listening socket at `path`, born 0660. Call only while holding the daemon
    lock: that is what makes replacing a stale socket file safe."""
    path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    _remove_stale(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        old = os.umask(SOCKET_UMASK)  # process-wide, so held for the bind call only
        try:
            sock.bind(str(path))
        finally:
            os.umask(old)
        # Under the systemd unit the socket is born with the right group already (the
        # daemon runs as that group), and chown is refused by its SystemCallFilter: skip it.
        if group_gid is not None and path.lstat().st_gid != group_gid:
            try:
                os.chown(path, -1, group_gid)
            except PermissionError:
                log.warning("control_chown_failed", path=str(path), gid=group_gid)
        sock.listen(128)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def _remove_stale(path: Path) -> None:
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise SocketInUse(f"{path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(str(path))
    except OSError:
        # Nothing listens: a dead daemon's socket. We hold the lock, so it is ours to replace.
        log.info("control_stale_socket_removed", path=str(path))
        path.unlink(missing_ok=True)
        return
    finally:
        probe.close()
    raise SocketInUse(f"another process answers at {path}; is a second daemon using it?")


# --- the server -------------------------------------------------------------------------


@dataclass(eq=False)
class _Conn:
    peer: Peer
    caller: Caller  # resolved once per connection: a passwd lookup may read files
    writer: asyncio.StreamWriter
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    dropped: int = 0
    pump: asyncio.Task[None] | None = None
    unsubscribe: Callable[[], None] | None = None

    async def send(self, message: dict[str, Any]) -> None:
        try:
            data = rpc.encode(message)
        except (TypeError, ValueError):  # NaN or an unserialisable result: a bug upstream
            log.exception("control_encode_failed")
            fallback = rpc.RpcError(rpc.INTERNAL_ERROR, "internal error", id=message.get("id"))
            data = rpc.encode(fallback.reply())
        async with self.lock:
            self.writer.write(data)
            await self.writer.drain()


class _Lagged:
    def __init__(self, dropped: int) -> None:
        self.dropped = dropped


class ControlServer:
    """The `control` service: bind in `start()` (before READY), serve in `run()`."""

    name = "control"

    def __init__(
        self,
        app: App,
        *,
        methods: Mapping[str, Method[Any]] | None = None,
        event_queue: int = EVENT_QUEUE,
        max_connections: int = MAX_CONNECTIONS,
        idle_timeout: float = IDLE_TIMEOUT,
    ) -> None:
        self.app = app
        self.methods = METHODS if methods is None else methods
        self.event_queue = event_queue
        self.max_connections = max_connections
        self.idle_timeout = idle_timeout
        self._throttle = LogThrottle(app.clock)
        self.path = app.settings.daemon.socket
        self._sock: socket.socket | None = None
        self._bound_inode: tuple[int, int] | None = None
        self._rules = AccessRules(os.getuid())
        self._rules_of: DaemonSettings | None = None
        self._conns: set[asyncio.Task[None]] = set()
        self._seq = itertools.count(1)

    async def start(self) -> None:
        self._sock = bind_socket(self.path, self._current_rules().group_gid)
        st = self.path.lstat()
        self._bound_inode = (st.st_dev, st.st_ino)
        self.app.heartbeats.register(self.name)
        log.info("control_listening", path=str(self.path))

    def _current_rules(self) -> AccessRules:
        """The rules of the current settings: a config reload may change allowed_uids or
        socket_group (the socket file's group stays as bound until a restart)."""
        daemon = self.app.settings.daemon
        if daemon is not self._rules_of:
            self._rules = AccessRules.from_settings(daemon, daemon_uid=os.getuid())
            self._rules_of = daemon
        return self._rules

    async def run(self) -> None:
        if self._sock is None:
            await self.start()
        clock = self.app.clock
        serve = asyncio.create_task(self._accept_loop(), name="control-accept")
        stop = asyncio.create_task(self.app.stopping.wait(), name="control-stop")
        # Our own wake-up: sleep_until clears its interrupt event, and app.stopping must stay
        # set for everyone else. A failed accept loop also wakes us, so its error is raised
        # at once rather than at the next beat.
        wake = asyncio.Event()
        for task in (serve, stop):
            task.add_done_callback(lambda _: wake.set())
        try:
            while not self.app.stopping.is_set():
                self.app.heartbeats.beat(self.name)
                if serve.done():
                    serve.result()  # the accept loop never ends by itself: re-raise its error
                await clock.sleep_until(clock.now() + timedelta(seconds=BEAT_EVERY), wake)
        finally:
            stop.cancel()
            serve.cancel()
            await self.aclose()
            with contextlib.suppress(asyncio.CancelledError):
                await serve

    async def aclose(self) -> None:
        """Stop listening, remove our socket file, end every connection."""
        sock, self._sock = self._sock, None
        if sock is not None:
            with contextlib.suppress(OSError):
                st = self.path.lstat()
                if (st.st_dev, st.st_ino) == self._bound_inode:  # still ours, not a successor's
                    self.path.unlink()
            sock.close()
        conns = list(self._conns)
        for task in conns:
            task.cancel()
        await asyncio.gather(*conns, return_exceptions=True)

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._sock is not None
        listener = self._sock
        while True:
            try:
                conn, _ = await loop.sock_accept(listener)
            except OSError as exc:  # EMFILE and friends: back off, keep serving
                if self._sock is None:
                    return  # closed under us: shutting down
                held = self._throttle.allow("accept_failed")
                if held is not None:
                    log.error("control_accept_failed", error=str(exc), held_back=held)
                await asyncio.sleep(0.1)
                continue
            try:
                peer = peer_of(conn)
            except OSError:
                conn.close()
                continue
            if not self._current_rules().allows(peer.uid, peer.gid, peer.groups):
                held = self._throttle.allow("refused")
                if held is not None:
                    log.warning(
                        "control_refused", uid=peer.uid, gid=peer.gid, pid=peer.pid, held_back=held
                    )
                conn.close()
                continue
            if len(self._conns) >= self.max_connections:
                self._refuse_busy(conn, peer)
                continue
            task = asyncio.create_task(
                self._connection(conn, peer), name=f"control-conn-{next(self._seq)}"
            )
            self._conns.add(task)
            task.add_done_callback(self._conns.discard)

    def _refuse_busy(self, conn: socket.socket, peer: Peer) -> None:
        held = self._throttle.allow("busy")
        if held is not None:
            log.warning(
                "control_busy",
                uid=peer.uid,
                pid=peer.pid,
                limit=self.max_connections,
                held_back=held,
            )
        err = rpc.RpcError(
            rpc.INTERNAL_ERROR,
            f"too many connections ({self.max_connections}); close some and try again",
            {"code": "busy"},
        )
        with contextlib.suppress(OSError):  # a best effort: the socket is non-blocking
            conn.send(rpc.encode(err.reply()))
        conn.close()

    async def _connection(self, conn: socket.socket, peer: Peer) -> None:
        try:
            reader, writer = await asyncio.open_unix_connection(sock=conn, limit=rpc.MAX_REQUEST)
        except OSError:
            conn.close()
            return
        c = _Conn(peer, Caller.of_uid(peer.uid), writer)
        try:
            await self._serve(c, reader)
        except (ConnectionError, BrokenPipeError):
            pass  # the client went away mid-reply
        except Exception:
            log.exception("control_connection_failed", pid=peer.pid, uid=peer.uid)
        finally:
            if c.unsubscribe is not None:
                c.unsubscribe()
            if c.pump is not None:
                c.pump.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await c.pump
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def _serve(self, c: _Conn, reader: asyncio.StreamReader) -> None:
        while True:
            try:
                async with asyncio.timeout(self.idle_timeout):
                    line = await reader.readuntil(b"\n")
            except TimeoutError:
                if c.unsubscribe is not None:
                    continue  # an event subscriber waits on us, not we on it
                log.debug("control_idle_closed", pid=c.peer.pid, timeout_s=self.idle_timeout)
                return
            except asyncio.IncompleteReadError as exc:  # EOF: a last line without newline
                if exc.partial.strip():
                    await self._handle(c, exc.partial)
                return
            except asyncio.LimitOverrunError:
                err = rpc.RpcError(
                    rpc.INVALID_REQUEST, f"request longer than {rpc.MAX_REQUEST} bytes"
                )
                await c.send(err.reply())
                return
            if line.strip():
                await self._handle(c, line)

    async def _handle(self, c: _Conn, line: bytes) -> None:
        try:
            req = rpc.parse(line)
        except rpc.RpcError as err:
            await c.send(err.reply())
            return
        try:
            value = await self._dispatch(c, req)
            try:
                reply = rpc.result(req.id, to_jsonable_python(value, fallback=str))
            except Exception:  # a result that cannot be JSON: a bug upstream, not a crash
                raise _internal(req.method) from None
        except rpc.RpcError as err:
            err.id = req.id
            reply = err.reply()
        if not req.notification:
            await c.send(reply)

    async def _dispatch(self, c: _Conn, req: rpc.Request) -> Any:
        if req.method == "events.subscribe":
            _validate(NoParams, req.params)
            self._subscribe(c)
            return {"subscribed": True}
        method = self.methods.get(req.method)
        if method is None:
            name = req.method if len(req.method) <= 80 else req.method[:80] + "..."
            raise rpc.RpcError(rpc.METHOD_NOT_FOUND, f"unknown method {name!r}")
        params = _validate(method.params, req.params)
        timeout = self.app.settings.daemon.request_timeout.total_seconds()
        try:
            async with asyncio.timeout(timeout) as scope:
                return await method.handler(self.app, c.caller, params)
        except TimeoutError:
            if not scope.expired():
                raise _internal(req.method) from None
            log.warning("control_timeout", method=req.method, timeout_s=timeout)
            raise rpc.RpcError(
                rpc.TIMEOUT, f"{req.method} took longer than {timeout:g} s", {"code": "timeout"}
            ) from None
        except DomainError as exc:
            data = to_jsonable_python({**exc.data, "code": exc.code}, fallback=str)
            raise rpc.RpcError(rpc.DOMAIN_ERROR, exc.message, data) from None
        except NotFoundError as exc:
            raise rpc.RpcError(rpc.DOMAIN_ERROR, str(exc.args[0]), {"code": "not_found"}) from None
        except IllegalTransition as exc:
            raise rpc.RpcError(rpc.DOMAIN_ERROR, str(exc), {"code": "invalid_state"}) from None
        except rpc.RpcError:
            raise
        except Exception:
            raise _internal(req.method) from None

    # --- events ---------------------------------------------------------------------------

    def _subscribe(self, c: _Conn) -> None:
        if c.pump is not None:
            return  # already subscribed: one stream per connection
        queue: asyncio.Queue[Event | _Lagged] = asyncio.Queue(maxsize=self.event_queue)

        def listener(event: Event) -> None:  # runs inside the store's commit path: cheap only
            if c.dropped and not queue.full():
                queue.put_nowait(_Lagged(c.dropped))
                c.dropped = 0
            try:
                queue.put_nowait(event)
            except asyncio.QueueFull:
                c.dropped += 1

        c.unsubscribe = self.app.store.subscribe(listener)
        c.pump = asyncio.create_task(self._pump(c, queue), name="control-events")

    async def _pump(self, c: _Conn, queue: asyncio.Queue[Event | _Lagged]) -> None:
        try:
            while True:
                item = await queue.get()
                params = (
                    lagged_json(item.dropped) if isinstance(item, _Lagged) else event_json(item)
                )
                await c.send(rpc.notification("event", params))
                if queue.empty() and c.dropped:
                    dropped, c.dropped = c.dropped, 0
                    await c.send(rpc.notification("event", lagged_json(dropped)))
        except (ConnectionError, BrokenPipeError):
            return  # the client went away; the reader sees EOF and cleans up


def _validate(model: type[Any], params: dict[str, Any]) -> Any:
    try:
        return model.model_validate(params)
    except ValidationError as exc:
        errors = [
            {"field": ".".join(str(p) for p in e["loc"]) or "(params)", "message": e["msg"]}
            for e in exc.errors(include_url=False, include_input=False)
        ]
        text = "; ".join(f"{e['field']}: {e['message']}" for e in errors[:5])
        raise rpc.RpcError(
            rpc.INVALID_PARAMS,
            f"invalid params: {text}",
            {"code": "invalid_params", "errors": errors[:20]},
        ) from None


def _internal(method: str) -> rpc.RpcError:
    log.exception("control_internal_error", method=method)
    return rpc.RpcError(rpc.INTERNAL_ERROR, "internal error; the daemon's log has the details")
