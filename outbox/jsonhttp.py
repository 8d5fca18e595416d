"""A small HTTP/1.1 server answering JSON, one request per connection, on asyncio alone.

The check-back server (``outbox.checkback_server``) and the notify query API
(``consumer.notify.api``) are built on it: a subclass says which requests it
accepts (``accept``, before the body is read), answers them (``answer``), and
may shape its error bodies (``error_body``) and add headers (``headers``).
A client that sends no complete request in time, or hangs up, gets nothing.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from types import TracebackType

__all__ = ["HttpError", "JsonHttpServer", "Reply", "Request"]

REASONS = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    409: "Conflict",
    411: "Length Required",
    413: "Content Too Large",
    500: "Internal Server Error",
}


class HttpError(Exception):
    """Ends a request early with this status and error."""

    def __init__(self, status: int, error: str) -> None:
        super().__init__(error)
        self.status = status
        self.error = error


@dataclass(frozen=True)
class Request:
    """One request as read: the headers' names in lower case."""

    method: str
    target: str
    headers: dict[str, str]
    body: bytes
    peer: str


@dataclass
class Reply:
    """One answer; ``context`` is the subclass's own, for ``headers``."""

    status: int
    answer: Any
    context: Any = None
    extra: dict[str, str] = field(default_factory=dict)


class JsonHttpServer:
    """The request loop; see the module docstring. ``start()`` binds, ``close()`` stops."""

    max_body: int = 64 * 1024
    """Larger bodies get 413."""
    require_length: bool = False
    """Refuse a request without Content-Length (or with Transfer-Encoding) with 411."""
    read_timeout: float = 10.0
    """Seconds a client may take to send its request."""
    too_large_hint: str = ""
    """Said after the 413 error (what the body should be instead)."""

    def __init__(self, host: str, port: int) -> None:
        self._host = host
        self._port = port
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[Any]] = set()

    @property
    def port(self) -> int:
        """The bound port (useful with port 0); raises ``RuntimeError`` before ``start()``."""
        if self._server is None:
            raise RuntimeError(f"the {type(self).__name__} is not started")
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        """Listen; returns once the socket is bound (``OSError`` if it cannot)."""
        self._server = await asyncio.start_server(self._serve, self._host, self._port)

    async def close(self) -> None:
        """Stop listening and cancel requests still being answered."""
        if self._server is None:
            return
        self._server.close()
        # Before Python 3.12 wait_closed() does not wait for open connections: cancel them.
        running = list(self._handlers)
        for task in running:
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)
        await self._server.wait_closed()
        self._server = None

    async def __aenter__(self) -> JsonHttpServer:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -- what a subclass says -----------------------------------------------------------

    def accept(self, method: str, target: str) -> None:
        """Raise ``HttpError`` for a request refused before its body is read (404, 405)."""

    async def answer(self, request: Request) -> Reply:
        """Answer ``request``; raise ``HttpError`` to refuse it."""
        raise NotImplementedError

    def error_body(self, error: HttpError, peer: str) -> Any:
        """The JSON body of an error answer."""
        return {"error": error.error}

    def headers(self, reply: Reply, body: bytes) -> dict[str, str]:
        """Headers to add to the answer, beyond ``reply.extra``."""
        return {}

    # -- the loop -----------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._handlers.add(task)
        try:
            peer = str(writer.get_extra_info("peername"))
            try:
                reply = await self.answer(await self._read(reader, peer))
            except HttpError as e:
                reply = Reply(e.status, self.error_body(e, peer))
            body = json.dumps(reply.answer, default=str).encode()
            extra = {**reply.extra, **self.headers(reply, body)}
            lines = "".join(f"{name}: {value}\r\n" for name, value in extra.items())
            writer.write(
                f"HTTP/1.1 {reply.status} {REASONS[reply.status]}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n{lines}"
                "Connection: close\r\n\r\n".encode()
                + body
            )
            await writer.drain()
        except (
            TimeoutError,
            asyncio.IncompleteReadError,
            ConnectionError,
            asyncio.LimitOverrunError,
        ):
            pass  # a client that sends no complete request or hangs up gets nothing
        finally:
            if task is not None:
                self._handlers.discard(task)
            writer.close()

    async def _read(self, reader: asyncio.StreamReader, peer: str) -> Request:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self.read_timeout)
        # latin-1 decodes any byte, so a malformed request gets a 400 rather than a crash.
        request_line, *lines = head.decode("latin-1").split("\r\n")
        parts = request_line.split(" ")
        if len(parts) != 3:
            raise HttpError(400, "malformed request line")
        method, target, _version = parts
        self.accept(method, target)
        headers: dict[str, str] = {}
        for line in lines:
            name, sep, value = line.partition(":")
            if sep:
                headers[name.strip().lower()] = value.strip()
        length = headers.get("content-length")
        if self.require_length and (length is None or "transfer-encoding" in headers):
            raise HttpError(411, "send the body with a Content-Length")
        length = length or "0"
        if not length.isdigit():
            raise HttpError(400, "malformed Content-Length")
        if int(length) > self.max_body:
            raise HttpError(
                413, f"the body is larger than {self.max_body} bytes{self.too_large_hint}"
            )
        body = b""
        if int(length):
            body = await asyncio.wait_for(reader.readexactly(int(length)), self.read_timeout)
        return Request(method, target, headers, body, peer)
