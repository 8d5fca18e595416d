"""Remote check-back: the relay asks a producer it does not run over signed HTTP.

Configured per topic pattern, first match wins:
``--remote-checkback 'payments.*=https://payments/outbox/checkback'``. The protocol is
``outbox.checkback_server``'s: the message as JSON, ``X-Outbox-Timestamp`` and
``X-Outbox-Signature`` (HMAC-SHA256 with the shared secret). The answer must be
signed too, since a forged ``rollback`` would discard a message whose local work
committed. Anything short of a signed 200 with a verdict is an ``OutboxError``,
which the sweep records as an unanswered check (retried with backoff, ``dead``
after ``max_checks``): never a decision.
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING

import httpx

from outbox.checkback_server import (
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    digest_of,
    encode_request,
    sign,
    signature_matches,
)
from outbox.errors import OutboxError
from outbox.half import Verdict
from outbox.logs import redact_url
from outbox.topics import topic_matches

if TYPE_CHECKING:
    from collections.abc import Mapping
    from datetime import timedelta

    from outbox.message import Message

__all__ = ["RemoteCheckbacks"]

_USER_AGENT = "outbox-relay"


class RemoteCheckbacks:
    """The producers' check-back endpoints by topic pattern, and the HTTP client that asks them.

    ``routes`` maps RabbitMQ topic patterns to ``http(s)`` URLs, in priority order
    (``RelayConfig.validate`` checks both). No I/O happens here: the HTTP client,
    reused for every check-back, is made on the first ``ask`` and closed by ``close()``.
    """

    def __init__(self, routes: Mapping[str, str], *, secret: str, timeout: timedelta) -> None:
        self._routes = dict(routes)
        self._secret = secret
        self._timeout = timeout.total_seconds()
        self._client: httpx.AsyncClient | None = None

    def find(self, topic: str) -> str | None:
        """Return the URL of the first pattern matching ``topic``, or None."""
        for pattern, url in self._routes.items():
            if topic_matches(pattern, topic):
                return url
        return None

    async def ask(self, url: str, message: Message) -> Verdict:
        """POST ``message`` to ``url`` signed, and return the endpoint's signed verdict.

        Raises ``OutboxError`` with a short reason (URL redacted) for a network
        error, a timeout, an answer other than 200, or an answer that is unsigned,
        wrongly signed or not ``{"verdict": "commit" | "rollback" | "unknown"}``.
        """
        shown = redact_url(url)
        try:
            body = encode_request(message)
        except (TypeError, ValueError) as e:
            raise OutboxError(f"remote check-back: the payload is not JSON ({e})") from None
        timestamp = str(int(time.time()))
        signature = sign(self._secret, timestamp, body)
        headers = {
            "Content-Type": "application/json",
            TIMESTAMP_HEADER: timestamp,
            SIGNATURE_HEADER: signature,
        }
        if self._client is None:
            # Redirects are not followed: that would send the signed message elsewhere.
            self._client = httpx.AsyncClient(
                timeout=self._timeout,
                follow_redirects=False,
                headers={"User-Agent": _USER_AGENT},
            )
        try:
            response = await self._client.post(url, content=body, headers=headers)
        except httpx.HTTPError as e:
            # httpx may quote the URL in its message; only the redacted form may leave here.
            reason = str(e).replace(url, shown)[:200] or "no detail"
            raise OutboxError(
                f"remote check-back {shown} failed: {type(e).__name__}: {reason}"
            ) from None
        if response.status_code != 200:
            raise OutboxError(
                f"remote check-back {shown} answered HTTP {response.status_code}"
                f"{_error_of(response)}"
            )
        if not signature_matches(
            self._secret,
            digest_of(signature),
            response.content,
            response.headers.get(SIGNATURE_HEADER),
        ):
            raise OutboxError(
                f"remote check-back {shown} answered without a valid {SIGNATURE_HEADER}: "
                "not an outbox check-back server, or another secret"
            )
        try:
            return Verdict(response.json()["verdict"])
        except (ValueError, KeyError, TypeError):
            raise OutboxError(
                f"remote check-back {shown} answered 200 without a valid verdict"
            ) from None

    async def close(self) -> None:
        """Close the HTTP client (its pooled connections); ``ask`` makes a new one if called."""
        if self._client is not None:
            client, self._client = self._client, None
            await client.aclose()


def _error_of(response: httpx.Response) -> str:
    """``": <error>"`` from a non-200 JSON answer, or nothing: a hint for ``last_error``."""
    try:
        error = json.loads(response.content).get("error")
    except (ValueError, AttributeError):
        return ""
    return f": {str(error)[:200]}" if error else ""
