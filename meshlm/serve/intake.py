"""What a request brings before it is parsed: its API key, its deadline, and its body under size and time limits."""

from __future__ import annotations

import asyncio
import math

from fastapi import Request

from meshlm.serve.errors import APIError, invalid
from meshlm.serve.protocol import Deadline

TIMEOUT_HEADER = "X-Request-Timeout"


def bearer_token(headers: list[tuple[bytes, bytes]]) -> bytes:
    """The token of an 'Authorization: Bearer <token>' header, the scheme in any case (RFC 7235); else b''."""
    scheme, _, token = dict(headers).get(b"authorization", b"").strip().partition(b" ")
    return token.strip() if scheme.lower() == b"bearer" else b""


def request_deadline(header: str | None, limit_s: float, arrived: float) -> Deadline:
    """The request's deadline: --request-timeout after arrival, or the X-Request-Timeout header when lower."""
    if header is None:
        return Deadline(arrived + limit_s, limit_s, "--request-timeout")
    try:
        seconds = float(header)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise invalid(f"{TIMEOUT_HEADER} must be a positive number of seconds, got {header!r}.", TIMEOUT_HEADER,
                      "invalid_header")
    if seconds >= limit_s:
        return Deadline(arrived + limit_s, limit_s, "--request-timeout")
    return Deadline(arrived + seconds, seconds, TIMEOUT_HEADER)


async def read_body(request: Request, limit: int, timeout_s: float) -> bytes:
    """The whole body: 413 past `limit` bytes, 408 when it takes over `timeout_s`."""
    try:
        async with asyncio.timeout(timeout_s):
            return await _receive(request, limit)
    except TimeoutError:
        raise APIError(408, f"The request body did not arrive within {timeout_s:g} s (the server's "
                       "--body-timeout); send the whole body at once.", code="body_timeout",
                       headers={"Connection": "close"}, reason="body_timeout") from None


async def _receive(request: Request, limit: int) -> bytes:
    size = request.headers.get("content-length")
    if size is not None and size.isdigit() and int(size) > limit:
        raise APIError(413, f"The body has {size} bytes; the limit is {limit}.", code="body_too_large",
                       reason="body_too_large")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise APIError(413, f"The body exceeds the limit of {limit} bytes.", code="body_too_large",
                           reason="body_too_large")
    return bytes(body)
