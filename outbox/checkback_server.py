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
from outbox.jsonhttp import HttpError, JsonHttpServer, Reply, Request
from outbox.logs import get_logger
from outbox.message import HeaderValue, Message
from outbox.topics import validate_topic

if TYPE_CHECKING:
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


class CheckbackServer(JsonHttpServer):
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

    max_body = MAX_BODY
    require_length = True

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
        super().__init__(host, port)
        self._outbox = outbox
        self._path = path
        self._max_skew = max_skew.total_seconds()
        self._log = get_logger("outbox.checkback_server")

    @property
    def url(self) -> str:
        """``http://host:port/path`` of the endpoint, for ``--remote-checkback`` and tests."""
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"http://{host}:{self.port}{self._path}"

    async def start(self) -> None:
        """Listen; returns once the socket is bound."""
        await super().start()
        self._log.info("checkback_server.started", host=self._host, port=self.port, path=self._path)

    async def __aenter__(self) -> CheckbackServer:
        await self.start()
        return self

    def accept(self, method: str, target: str) -> None:
        """Only ``POST {path}``; refused before the body is read."""
        if target.partition("?")[0] != self._path:
            raise HttpError(404, f"not found: POST {self._path}")
        if method != "POST":
            raise HttpError(405, f"use POST {self._path}")

    async def answer(self, request: Request) -> Reply:
        """Authenticate, then ask the check-back; the 200 answer is signed under ``context``."""
        context = self._authenticate(request.body, request.headers)
        return Reply(200, await self._check(request.body), context=context)

    def error_body(self, error: HttpError, peer: str) -> Any:
        """``{"verdict": "unknown", "error": ...}``; a refused signature is logged."""
        if error.status == 401:
            self._log.warning("checkback_server.rejected", reason=error.error, peer=peer)
        return {"verdict": Verdict.UNKNOWN.value, "error": error.error}

    def headers(self, reply: Reply, body: bytes) -> dict[str, str]:
        """The answer's signature, for a 200."""
        if reply.context is None:
            return {}
        return {SIGNATURE_HEADER: sign(self._secret, reply.context, body)}

    def _authenticate(self, body: bytes, headers: dict[str, str]) -> str:
        """Check timestamp and signature; return the context the answer is signed under."""
        timestamp = headers.get(TIMESTAMP_HEADER.lower())
        signature = headers.get(SIGNATURE_HEADER.lower())
        if not timestamp or not signature:
            raise HttpError(401, f"missing {TIMESTAMP_HEADER} or {SIGNATURE_HEADER}")
        if not timestamp.isdigit():
            raise HttpError(401, f"{TIMESTAMP_HEADER} must be unix seconds")
        # Bounds how long a captured request can be replayed; a replay only repeats a
        # read-only question, but an old one must not be answerable forever.
        if abs(time.time() - int(timestamp)) > self._max_skew:
            raise HttpError(401, f"stale {TIMESTAMP_HEADER}: check both hosts' clocks")
        if not signature_matches(self._secret, timestamp, body, signature):
            raise HttpError(401, "bad signature: do both sides use the same secret?")
        # The answer is signed under the request's digest, so it cannot be replayed
        # as the answer to another request.
        return digest_of(sign(self._secret, timestamp, body))

    async def _check(self, body: bytes) -> dict[str, str]:
        try:
            message = decode_request(body)
        except ValueError as e:
            raise HttpError(400, f"malformed check-back request: {e}"[:300]) from None
        ids = {"message_id": message.message_id, "topic": message.topic, "key": message.key}
        function = self._outbox.checkback_for(message.topic)
        if function is None:
            self._log.warning("checkback_server.no_checkback", **ids)
            raise HttpError(404, "no check-back for topic")
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
            raise HttpError(500, error) from None
        try:
            verdict = Verdict(answer)
        except ValueError:
            error = f"check-back returned {answer!r}, not a Verdict"[:300]
            self._log.error("checkback_server.checkback_failed", error=error, **ids)
            raise HttpError(500, error) from None
        self._log.info("checkback_server.answered", verdict=verdict.value, **ids)
        return {"verdict": verdict.value}
