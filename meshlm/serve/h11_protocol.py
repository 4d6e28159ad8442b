"""uvicorn's h11 protocol, answering in the OpenAI error shape the requests the app never sees.

Headers over MAX_HEADER_BYTES get 431 (uvicorn's own answer is a text/plain 400, and h11 checks its size
limit only while headers are incomplete, so large headers that arrive at once used to pass); malformed
HTTP gets 400. After answering, the connection reads and drops what the client still sends for up to
LINGER_S before closing: closing with unread data would reset it before the client reads the answer.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import STATUS_PHRASES, H11Protocol

from meshlm.serve.errors import error_body

MAX_HEADER_BYTES = 16 * 1024  # request line and headers; also h11's limit on an incomplete event
LINGER_S = 2.0


def header_bytes(event: h11.Request) -> int:
    """Bytes of a request's request line and header lines as sent (within a few for spacing)."""
    return len(event.method) + len(event.target) + 12 + sum(len(k) + len(v) + 4 for k, v in event.headers)


class RefusingH11Protocol(H11Protocol):
    """H11Protocol with OpenAI-shaped 431 / 400 refusals and a lingering close after them."""

    on_refused: Callable[[str], None] = staticmethod(lambda code: None)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._error: h11.RemoteProtocolError | None = None
        self._refused = False
        next_event = self.conn.next_event

        def checked_next_event() -> Any:
            try:
                event = next_event()
            except h11.RemoteProtocolError as e:
                self._error = e
                raise
            if isinstance(event, h11.Request) and header_bytes(event) > MAX_HEADER_BYTES:
                self._error = h11.RemoteProtocolError("request headers too large", error_status_hint=431)
                raise self._error
            return event

        self.conn.next_event = checked_next_event  # uvicorn reads every event through this

    def data_received(self, data: bytes) -> None:
        """Parse, or drop the data once refused."""
        if not self._refused:
            super().data_received(data)

    def send_400_response(self, msg: str) -> None:
        """Answer the refused request (431 or 400) as JSON, then linger and close."""
        status = self._error.error_status_hint if self._error is not None else 400
        if status == 431:
            message, code = (f"The request line and headers exceed {MAX_HEADER_BYTES} bytes; send fewer or "
                             "smaller headers.", "headers_too_large")
        else:
            status, message, code = 400, f"Malformed HTTP request: {self._error or msg}", "malformed_http"
        body = json.dumps(error_body(status, message, None, code)).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                   (b"connection", b"close")]
        try:
            for event in (h11.Response(status_code=status, headers=headers, reason=STATUS_PHRASES[status]),
                          h11.Data(data=body), h11.EndOfMessage()):
                self.transport.write(self.conn.send(event))
        except h11.LocalProtocolError:  # a response had already begun: nothing more can be said
            self.transport.close()
            return
        self.on_refused(code)
        self._refused = True
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.loop.call_later(LINGER_S, self.transport.close)


def protocol_class(on_refused: Callable[[str], None]) -> type[H11Protocol]:
    """A RefusingH11Protocol that reports each refusal's code to on_refused (for uvicorn.Config(http=...))."""
    return type("MeshlmH11Protocol", (RefusingH11Protocol,), {"on_refused": staticmethod(on_refused)})
