"""uvicorn with the limits it lacks against slow clients.

uvicorn closes idle keep-alive connections but has no deadline for a request's headers and no
hard cap on open connections (its ``limit_concurrency`` answers 503 only once a request has
arrived), so a client that trickles header bytes holds a socket for ever; and it leaves the
TLS handshake to asyncio's 60 s default. :class:`GuardedH11Protocol` adds the header deadline
and the cap per connection with the event loop's timers; :class:`GuardedServer` runs on a loop
whose TLS servers give up on a handshake after the same deadline. The body deadline is the
app's (:func:`medsec.service.app.create_app`), where a late body is audited as a 408.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import socket
from typing import Any

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("medsec.service")
_BUSY_TEXT = b"too many open connections; try again later"
_BUSY = (
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain\r\n"
    b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(_BUSY_TEXT), _BUSY_TEXT)
)


class GuardedH11Protocol(H11Protocol):
    """h11 protocol with a header deadline and a connection cap (set by :func:`guarded`)."""

    header_timeout_s: float = 10.0
    max_connections: int = 64

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._refused = False
        self._header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if len(self.connections) >= self.max_connections:
            self._refused = True  # never registered: uses no slot, reads nothing
            transport.write(_BUSY)
            transport.close()
            return
        super().connection_made(transport)
        self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._refused:
            return
        self._disarm_header_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if not self._refused:
            super().data_received(data)

    def handle_events(self) -> None:
        cycle = self.cycle
        super().handle_events()
        if self.cycle is not cycle:  # a request line and all its headers have arrived
            self._disarm_header_timer()

    def on_response_complete(self) -> None:
        self._arm_header_timer()  # the next request on this connection has the same deadline
        super().on_response_complete()  # may start a pipelined request (disarming it again)

    def _arm_header_timer(self) -> None:
        self._disarm_header_timer()
        if not self.transport.is_closing():
            self._header_timer = self.loop.call_later(self.header_timeout_s, self._header_late)

    def _disarm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_late(self) -> None:
        self._header_timer = None
        if not self.transport.is_closing():
            log.debug("closing %s: no complete request in %s s", self.client, self.header_timeout_s)
            self.transport.close()


def guarded(header_timeout_s: float, max_connections: int) -> type[GuardedH11Protocol]:
    """A protocol class for ``uvicorn.Config(http=...)`` with these limits."""
    limits = {"header_timeout_s": header_timeout_s, "max_connections": max_connections}
    return type("GuardedH11Protocol", (GuardedH11Protocol,), limits)


class _HandshakeDeadlineLoop(asyncio.SelectorEventLoop):
    """An event loop whose TLS servers drop a client that has not finished its handshake
    within ``handshake_timeout_s`` (uvicorn passes no timeout, so asyncio's 60 s would hold)."""

    def __init__(self, handshake_timeout_s: float) -> None:
        super().__init__()
        self._handshake_timeout_s = handshake_timeout_s

    async def create_server(self, *args: Any, **kwargs: Any) -> asyncio.Server:  # type: ignore[override]
        if kwargs.get("ssl") is not None:
            kwargs.setdefault("ssl_handshake_timeout", self._handshake_timeout_s)
        return await super().create_server(*args, **kwargs)


class GuardedServer(uvicorn.Server):
    """A uvicorn server whose TLS handshakes have a deadline (:class:`_HandshakeDeadlineLoop`)."""

    def __init__(self, config: uvicorn.Config, handshake_timeout_s: float) -> None:
        super().__init__(config)
        self.handshake_timeout_s = handshake_timeout_s

    def run(self, sockets: list[socket.socket] | None = None) -> None:
        factory = functools.partial(_HandshakeDeadlineLoop, self.handshake_timeout_s)
        with asyncio.Runner(loop_factory=factory) as runner:
            runner.run(self.serve(sockets=sockets))
