"""Remote check-back: the producer answers the relay's check-backs over signed HTTP.

When the relay does not run the producer's code (no ``--app``), it asks the
producer back over HTTP instead: ``outbox relay --remote-checkback
'payments.*=http://payments:8088/outbox/checkback'``. The producer serves the
check-backs it registered with ``@ob.checkback`` next to its own work::

    ob = Outbox(engine)

    @ob.checkback("payments.*")
    def check(message: Message) -> Verdict: ...

    async with CheckbackServer(ob, secret=os.environ["OUTBOX_CHECKBACK_SECRET"], host="0.0.0.0"):
        await serve_the_rest_of_the_app()

The protocol (docs/half-messages.md, "Remote check-back") lives in this module,
for both ends: ``POST`` of the message as JSON, signed with HMAC-SHA256 over
``timestamp + "." + body`` with a secret both sides share; the answer
``{"verdict": "commit" | "rollback" | "unknown"}`` is signed too, bound to the
request's signature, because a forged ``rollback`` would silently discard a
message whose local work committed.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import inspect
import json
import time
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from outbox.errors import ConfigurationError
from outbox.half import Verdict
from outbox.ids import normalize_message_id
from outbox.logs import get_logger
from outbox.message import HeaderValue, Message
from outbox.topics import validate_topic

if TYPE_CHECKING:
    from types import TracebackType

    from outbox.half import AsyncOutbox, Outbox

__all__ = [
    "DEFAULT_PATH",
    "MAX_BODY",
    "MIN_SECRET_LENGTH",
    "SIGNATURE_HEADER",
    "TIMESTAMP_HEADER",
    "CheckbackServer",
    "check_secret",
    "decode_request",
    "digest_of",
    "encode_request",
    "sign",
    "signature_matches",
]

DEFAULT_PATH = "/outbox/checkback"
TIMESTAMP_HEADER = "X-Outbox-Timestamp"
"""Unix seconds when the relay signed the request; the server refuses stale ones."""
SIGNATURE_HEADER = "X-Outbox-Signature"
"""``v1=<hex HMAC-SHA256>``: of ``timestamp.body`` on a request, of ``request-hex.body`` on
an answer."""
MAX_BODY = 1024 * 1024
"""The largest request body the server reads (1 MiB): one message and its payload."""
MIN_SECRET_LENGTH = 16
"""A shorter secret could be guessed offline from one captured request."""
_SCHEME = "v1"
_READ_TIMEOUT = 10.0  # seconds a client may take to send its request
_REASONS = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    404: "Not Found",
    405: "Method Not Allowed",
    411: "Length Required",
    413: "Content Too Large",
    500: "Internal Server Error",
}
_HEADER_TYPES = (str, int, float, bool, type(None))


def check_secret(secret: object, what: str) -> str:
    """Return ``secret`` if it is usable for signing, else raise ``ConfigurationError``."""
    if not isinstance(secret, str) or len(secret) < MIN_SECRET_LENGTH:
        raise ConfigurationError(
            f"{what} must be a string of at least {MIN_SECRET_LENGTH} characters; make one with "
            "python -c 'import secrets; print(secrets.token_hex(32))'"
        )
    return secret


def sign(secret: str, context: str, body: bytes) -> str:
    """Return the signature header value ``v1=<hex>`` of ``body`` under ``context``.

    ``context`` is the request's timestamp for a request and the request
    signature's hex digest for an answer; it and the body are joined with ``.``.
    """
    mac = hmac.new(secret.encode(), context.encode() + b"." + body, hashlib.sha256)
    return f"{_SCHEME}={mac.hexdigest()}"


def signature_matches(secret: str, context: str, body: bytes, header: str | None) -> bool:
    """Tell whether ``header`` carries a valid signature of ``body`` (constant-time compare).

    The header may list several comma-separated ``scheme=hex`` entries; one valid
    ``v1`` entry is enough (room for a second scheme or a rotated secret later).
    """
    if not header:
        return False
    expected = sign(secret, context, body).encode()
    found = False
    for entry in header.split(","):
        # latin-1 maps every header byte to itself, so compare_digest always gets bytes.
        found |= hmac.compare_digest(expected, entry.strip().encode("latin-1", "replace"))
    return found


def digest_of(signature: str) -> str:
    """The hex part of a ``v1=<hex>`` signature: what an answer's signature is bound to."""
    return signature.partition("=")[2]


def encode_request(message: Message) -> bytes:
    """The request body the relay sends for ``message`` (compact JSON, UTF-8).

    Raises ``TypeError`` or ``ValueError`` if the payload is not JSON-serialisable.
    """
    return json.dumps(
        {
            "message_id": message.message_id,
            "topic": message.topic,
            "key": message.key,
            "payload": message.payload,
            "headers": dict(message.headers),
            "created_at": message.created_at.isoformat(),
        },
        separators=(",", ":"),
        ensure_ascii=False,
        allow_nan=False,
    ).encode()


def decode_request(body: bytes) -> Message:
    """Read a request body back into the ``Message``; raise ``ValueError`` saying what is wrong."""
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"the body is not JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValueError("the body must be a JSON object")
    missing = {"message_id", "topic", "payload", "created_at"} - data.keys()
    if missing:
        raise ValueError(f"missing fields: {sorted(missing)}")
    key = data.get("key")
    if key is not None and not isinstance(key, str):
        raise ValueError("key must be a string or null")
    headers = data.get("headers") or {}
    if not isinstance(headers, dict) or not all(
        isinstance(v, _HEADER_TYPES) for v in headers.values()
    ):
        raise ValueError("headers must be an object of strings, numbers, booleans or nulls")
    created = data["created_at"]
    try:
        created_at = datetime.fromisoformat(created) if isinstance(created, str) else None
    except ValueError:
        created_at = None
    if created_at is None:
        raise ValueError("created_at must be an ISO 8601 timestamp")
    headers_typed: dict[str, HeaderValue] = headers
    return Message(
        message_id=normalize_message_id(str(data["message_id"])),
        topic=validate_topic(data["topic"]),
        key=key,
        payload=data["payload"],
        headers=headers_typed,
        created_at=created_at if created_at.tzinfo else created_at.replace(tzinfo=UTC),
    )


class _Reply(Exception):
    """Ends a request early with this status and error (control flow inside ``_respond``)."""

    def __init__(self, status: int, error: str) -> None:
        super().__init__(error)
        self.status = status
        self.error = error


class CheckbackServer:
    """Serves the outbox's registered check-backs to a remote relay over signed HTTP.

    ``POST {path}`` with a signed message answers 200 ``{"verdict": ...}`` from
    the check-back registered for its topic (a sync one runs in a thread, an
    async one is awaited); 401 for a missing or bad signature or a timestamp
    more than ``max_skew`` away from this host's clock; 404 when no check-back
    answers for the topic; 400 for a malformed body; 500 when the check-back
    raises. Every non-200 answer is ``{"verdict": "unknown", "error": ...}``,
    which the relay turns into "ask again later". No I/O happens here; call
    ``start()`` or use ``async with``. ``host`` defaults to loopback: give
    ``"0.0.0.0"`` for a relay on another host (and put TLS in front of it when
    the network is not trusted: the signature authenticates, it does not encrypt).
    """

    def __init__(
        self,
        outbox: Outbox | AsyncOutbox,
        *,
        secret: str,
        host: str = "127.0.0.1",
        port: int = 8088,
        path: str = DEFAULT_PATH,
        max_skew: timedelta = timedelta(minutes=5),
    ) -> None:
        self._secret = check_secret(secret, "secret")
        if not path.startswith("/"):
            raise ConfigurationError(f"path must start with '/', got {path!r}")
        if not isinstance(max_skew, timedelta) or max_skew <= timedelta(0):
            raise ConfigurationError(f"max_skew must be a positive timedelta, got {max_skew!r}")
        if not 0 <= port <= 65535:
            raise ConfigurationError(f"port must be 0-65535, got {port}")
        self._outbox = outbox
        self._host = host
        self._port = port
        self._path = path
        self._max_skew = max_skew.total_seconds()
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[Any]] = set()
        self._log = get_logger("outbox.checkback_server")

    @property
    def port(self) -> int:
        """The bound port (useful with ``port=0``); raises ``RuntimeError`` before ``start()``."""
        if self._server is None:
            raise RuntimeError("the check-back server is not started")
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def url(self) -> str:
        """``http://host:port/path`` of the endpoint, for ``--remote-checkback`` and tests."""
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"http://{host}:{self.port}{self._path}"

    async def start(self) -> None:
        """Listen; returns once the socket is bound."""
        self._server = await asyncio.start_server(self._serve, self._host, self._port)
        self._log.info("checkback_server.started", host=self._host, port=self.port, path=self._path)

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

    async def __aenter__(self) -> CheckbackServer:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._handlers.add(task)
        try:
            status, answer, context = await self._respond(reader, writer)
            body = json.dumps(answer).encode()
            signature = (
                f"{SIGNATURE_HEADER}: {sign(self._secret, context, body)}\r\n" if context else ""
            )
            writer.write(
                f"HTTP/1.1 {status} {_REASONS[status]}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n{signature}Connection: close\r\n\r\n".encode()
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

    async def _respond(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> tuple[int, dict[str, str], str | None]:
        """Answer one request: (status, JSON answer, what to sign a 200 answer under)."""
        try:
            body, headers = await self._read(reader)
            context = self._authenticate(body, headers)
            return 200, await self._check(body), context
        except _Reply as reply:
            if reply.status == 401:
                peer = writer.get_extra_info("peername")
                self._log.warning("checkback_server.rejected", reason=reply.error, peer=str(peer))
            return reply.status, {"verdict": Verdict.UNKNOWN.value, "error": reply.error}, None

    async def _read(self, reader: asyncio.StreamReader) -> tuple[bytes, dict[str, str]]:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), _READ_TIMEOUT)
        # latin-1 decodes any byte, so a malformed request gets a 400 rather than a crash.
        request_line, *lines = head.decode("latin-1").split("\r\n")
        parts = request_line.split(" ")
        if len(parts) != 3:
            raise _Reply(400, "malformed request line")
        method, target, _version = parts
        if target.partition("?")[0] != self._path:
            raise _Reply(404, f"not found: POST {self._path}")
        if method != "POST":
            raise _Reply(405, f"use POST {self._path}")
        headers: dict[str, str] = {}
        for line in lines:
            name, sep, value = line.partition(":")
            if sep:
                headers[name.strip().lower()] = value.strip()
        length = headers.get("content-length")
        if length is None or "transfer-encoding" in headers:
            raise _Reply(411, "send the body with a Content-Length")
        if not length.isdigit():
            raise _Reply(400, "malformed Content-Length")
        if int(length) > MAX_BODY:
            raise _Reply(413, f"the body is larger than {MAX_BODY} bytes")
        body = await asyncio.wait_for(reader.readexactly(int(length)), _READ_TIMEOUT)
        return body, headers

    def _authenticate(self, body: bytes, headers: dict[str, str]) -> str:
        """Check timestamp and signature; return the context the answer is signed under."""
        timestamp = headers.get(TIMESTAMP_HEADER.lower())
        signature = headers.get(SIGNATURE_HEADER.lower())
        if not timestamp or not signature:
            raise _Reply(401, f"missing {TIMESTAMP_HEADER} or {SIGNATURE_HEADER}")
        if not timestamp.isdigit():
            raise _Reply(401, f"{TIMESTAMP_HEADER} must be unix seconds")
        # Bounds how long a captured request can be replayed; a replay only repeats a
        # read-only question, but an old one must not be answerable forever.
        if abs(time.time() - int(timestamp)) > self._max_skew:
            raise _Reply(401, f"stale {TIMESTAMP_HEADER}: check both hosts' clocks")
        if not signature_matches(self._secret, timestamp, body, signature):
            raise _Reply(401, "bad signature: do both sides use the same secret?")
        # The answer is signed under the request's digest, so it cannot be replayed
        # as the answer to another request.
        return digest_of(sign(self._secret, timestamp, body))

    async def _check(self, body: bytes) -> dict[str, str]:
        try:
            message = decode_request(body)
        except ValueError as e:
            raise _Reply(400, f"malformed check-back request: {e}"[:300]) from None
        ids = {"message_id": message.message_id, "topic": message.topic, "key": message.key}
        function = self._outbox.checkback_for(message.topic)
        if function is None:
            self._log.warning("checkback_server.no_checkback", **ids)
            raise _Reply(404, "no check-back for topic")
        try:
            if inspect.iscoroutinefunction(function):
                answer = await function(message)
            else:
                # A sync check-back may block (it queries a database or an API): not on the loop.
                answer = await asyncio.to_thread(function, message)
            if inspect.isawaitable(answer):
                answer = await answer
        except Exception as e:
            error = f"check-back raised {type(e).__name__}: {e}"[:300]
            self._log.error("checkback_server.checkback_failed", error=error, **ids)
            raise _Reply(500, error) from None
        try:
            verdict = Verdict(answer)
        except ValueError:
            error = f"check-back returned {answer!r}, not a Verdict"[:300]
            self._log.error("checkback_server.checkback_failed", error=error, **ids)
            raise _Reply(500, error) from None
        self._log.info("checkback_server.answered", verdict=verdict.value, **ids)
        return {"verdict": verdict.value}
