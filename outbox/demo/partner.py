"""A partner's webhook endpoint for the demo: it verifies signatures and fails on cue."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["Partner"]


class Partner:
    """An HTTP/1.1 endpoint on 127.0.0.1 that answers ``fail_first`` calls with 503, then 200.

    Every call's ``X-Outbox-Signature`` is checked against ``secret`` as a
    receiver should (docs/notify.md); a bad signature gets 401. ``on_call`` is
    told each call's message id, attempt and the status it got.
    """

    def __init__(
        self,
        secret: str,
        *,
        fail_first: int = 1,
        on_call: Callable[[str, str, int], None] | None = None,
    ) -> None:
        self._secret = secret.encode()
        self._fail_first = fail_first
        self._on_call = on_call
        self._server: asyncio.Server | None = None
        self.calls: list[tuple[str, int]] = []
        """(message id, status answered) per call, in order."""

    @property
    def url(self) -> str:
        """Where to POST."""
        assert self._server is not None, "start() the partner first"
        port = self._server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}/hooks/payments"

    async def start(self) -> None:
        """Listen on a free port."""
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)

    async def close(self) -> None:
        """Stop listening."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            headers = {}
            for line in head.decode("latin-1").split("\r\n")[1:]:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            body = await reader.readexactly(int(headers.get("content-length", "0")))
            status = self._answer(headers, body)
            reason = {200: "OK", 401: "Unauthorized", 503: "Service Unavailable"}[status]
            writer.write(
                f"HTTP/1.1 {status} {reason}\r\ncontent-length: 0\r\n"
                "connection: close\r\n\r\n".encode()
            )
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, ValueError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    def _answer(self, headers: dict[str, str], body: bytes) -> int:
        timestamp = headers.get("x-outbox-timestamp", "")
        expected = hmac.new(self._secret, timestamp.encode() + b"." + body, hashlib.sha256)
        given = headers.get("x-outbox-signature", "")
        if not hmac.compare_digest(given, f"v1={expected.hexdigest()}"):
            status = 401
        elif len(self.calls) < self._fail_first:
            status = 503
        else:
            status = 200
        message_id = headers.get("x-outbox-message-id", "?")
        self.calls.append((message_id, status))
        if self._on_call is not None:
            self._on_call(message_id, headers.get("x-outbox-attempt", "?"), status)
        return status
