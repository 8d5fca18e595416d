"""The query API: what was notified, every attempt, and a manual retry, over HTTP with a token.

- ``GET /notifications/{message_id}``: the message's notification per
  subscription, each with every attempt (time, status code, error, duration);
- ``GET /notifications?subscription=&status=&since=&until=&after=&limit=``:
  notifications matching every filter, oldest first (``since``/``until``: ISO
  8601 times with a UTC offset, on when the notification was created; ``after``:
  the last id of the page before; ``limit``: 1-1000, default 100);
- ``POST /notifications/{id}/retry``: a pending or abandoned notification is due
  now, with a fresh round of attempts; 409 if it is delivered or being called.

Every request needs ``Authorization: Bearer <token>``: the service token
(``OUTBOX_NOTIFY_TOKEN``) sees everything; a subscription's own token
(``token_env``) sees that subscription's notifications only, so a partner can
reconcile what it missed without seeing anyone else's. Answers are JSON; errors
are ``{"error": "..."}`` with the status. HTTP/1.1, one request per connection,
served by ``outbox.jsonhttp``.
"""

from __future__ import annotations

import hmac
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, unquote, urlsplit

from consumer.notify.store import RetryOutcome
from outbox.errors import ConfigurationError
from outbox.ids import normalize_message_id
from outbox.jsonhttp import HttpError, JsonHttpServer, Reply, Request
from outbox.logs import get_logger
from outbox.tables import NotificationStatus

if TYPE_CHECKING:
    from collections.abc import Callable

    from consumer.notify.config import NotifyConfig
    from consumer.notify.store import NotifyStore

__all__ = ["MAX_LIMIT", "QueryAPI"]

MAX_LIMIT = 1000
"""The most notifications one list request returns."""
_DEFAULT_LIMIT = 100
_LIST_PARAMS = {"subscription", "status", "since", "until", "after", "limit"}
_STATUSES = [s.value for s in NotificationStatus]


class QueryAPI(JsonHttpServer):
    """Serves the query API for ``store``; ``start()`` binds, ``close()`` stops.

    ``on_retry`` is called after a manual retry made a notification due (the
    service wakes its dispatcher with it). No I/O happens before ``start()``.
    """

    too_large_hint = "; none is needed"  # a request here carries no meaningful body

    def __init__(
        self,
        store: NotifyStore,
        config: NotifyConfig,
        *,
        on_retry: Callable[[], None] | None = None,
    ) -> None:
        super().__init__(config.api_host, config.api_port)
        self._store = store
        self._config = config
        self._on_retry = on_retry
        # (token, scope): scope None for the service token, else the one subscription.
        self._tokens: list[tuple[bytes, str | None]] = [(config.token.encode(), None)]
        self._tokens += [
            (s.token.encode(), s.name) for s in config.subscriptions if s.token is not None
        ]
        self._schedules = {s.name: len(s.schedule) for s in config.subscriptions}
        self._log = get_logger("outbox.notify")

    async def start(self) -> None:
        """Listen; returns once the socket is bound. ``ConfigurationError`` if it cannot."""
        try:
            await super().start()
        except OSError as e:
            raise ConfigurationError(
                f"the query API cannot listen on {self._host}:{self._port} "
                f"({e.strerror or e}); set api_port (or --api-port) to a free port"
            ) from None

    # -- HTTP ---------------------------------------------------------------------------

    async def answer(self, request: Request) -> Reply:
        """Authenticate the token, then route; an unexpected failure is a 500, logged."""
        scope = self._authenticate(request.headers, request.peer)
        try:
            return Reply(200, await self._route(request.method, request.target, scope))
        except HttpError:
            raise
        except Exception as e:  # the database is away, or a bug: say so, keep serving
            self._log.error("notify.api_failed", error=f"{type(e).__name__}: {e}"[:300])
            raise HttpError(
                500, f"the query failed: {type(e).__name__}; see the service's log"
            ) from None

    def headers(self, reply: Reply, body: bytes) -> dict[str, str]:
        """The Bearer challenge on a 401."""
        return {"WWW-Authenticate": 'Bearer realm="outbox-notify"'} if reply.status == 401 else {}

    def _authenticate(self, headers: dict[str, str], peer: str) -> str | None:
        """Return the scope of the request's token (None: everything); 401 without a good one."""
        scheme, _, token = headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise HttpError(
                401, "send Authorization: Bearer <token> (the OUTBOX_NOTIFY_TOKEN value)"
            )
        given = token.strip().encode("latin-1", "replace")
        found: str | None = None
        matched = False
        # Every token is compared, each in constant time: the time taken tells nothing.
        for expected, scope in self._tokens:
            if hmac.compare_digest(expected, given) and not matched:
                matched, found = True, scope
        if not matched:
            self._log.warning(
                "notify.api_refused",
                reason="bad token",
                peer=peer,
            )
            raise HttpError(401, "the bearer token is not valid")
        return found

    # -- routes -------------------------------------------------------------------------

    async def _route(self, method: str, target: str, scope: str | None) -> dict[str, Any]:
        split = urlsplit(target)
        parts = [unquote(p) for p in split.path.strip("/").split("/")]
        if parts[0] != "notifications" or len(parts) > 3:
            raise HttpError(404, "not found: use /notifications or /notifications/{message_id}")
        if len(parts) == 3:
            if parts[2] != "retry":
                raise HttpError(404, "not found: use POST /notifications/{id}/retry")
            if method != "POST":
                raise HttpError(405, "use POST /notifications/{id}/retry")
            return await self._retry(parts[1], scope)
        if method != "GET":
            raise HttpError(405, f"use GET {split.path}")
        if len(parts) == 2:
            return await self._show(parts[1], scope)
        return await self._list(parse_qs(split.query, keep_blank_values=True), scope)

    async def _show(self, message_id: str, scope: str | None) -> dict[str, Any]:
        try:
            mid = normalize_message_id(message_id)
        except ValueError:
            raise HttpError(
                400, f"{message_id!r} is not a message id (a UUID, like 0190a1b2-...)"
            ) from None
        found = await self._store.of_message(mid, scope)
        if not found:
            raise HttpError(404, f"no notification of message {mid}")
        return {"message_id": mid, "notifications": [n.to_dict() for n in found]}

    async def _list(self, query: dict[str, list[str]], scope: str | None) -> dict[str, Any]:
        unknown = sorted(set(query) - _LIST_PARAMS)
        if unknown:
            raise HttpError(400, f"unknown parameter {unknown[0]!r}; use {sorted(_LIST_PARAMS)}")
        one = {name: values[-1] for name, values in query.items()}
        subscription = one.get("subscription") or None
        if scope is not None:
            if subscription not in (None, scope):
                raise HttpError(403, f"this token reads subscription {scope!r} only")
            subscription = scope
        status: NotificationStatus | None = None
        if one.get("status"):
            try:
                status = NotificationStatus(one["status"])
            except ValueError:
                raise HttpError(400, f"status must be one of {_STATUSES}") from None
        limit = _number(one, "limit", 1, MAX_LIMIT) or _DEFAULT_LIMIT
        after = _number(one, "after", 0, None)
        found = await self._store.search(
            subscription=subscription,
            status=status,
            since=_time(one, "since"),
            until=_time(one, "until"),
            after_id=after,
            limit=limit,
        )
        return {
            "notifications": [n.to_dict() for n in found],
            # Where the next page starts; None when this page was the last.
            "next_after": found[-1].id if len(found) == limit else None,
        }

    async def _retry(self, notification_id: str, scope: str | None) -> dict[str, Any]:
        if not notification_id.isdigit():
            raise HttpError(
                400,
                f"{notification_id!r} is not a notification id (the number that "
                "GET /notifications/{message_id} shows as id)",
            )
        outcome, view = await self._store.retry(
            int(notification_id), schedules=self._schedules, scope=scope
        )
        if outcome is RetryOutcome.NOT_FOUND or view is None:
            raise HttpError(404, f"no notification {notification_id}")
        if outcome is RetryOutcome.DELIVERED:
            raise HttpError(409, f"notification {notification_id} is delivered; nothing to retry")
        if outcome is RetryOutcome.IN_FLIGHT:
            raise HttpError(
                409, f"notification {notification_id} is being called right now; ask again shortly"
            )
        if outcome is RetryOutcome.UNKNOWN_SUBSCRIPTION:
            raise HttpError(
                409,
                f"subscription {view.subscription!r} is not in the configuration any more: "
                "there is no endpoint to call",
            )
        self._log.info(
            "notify.retry_requested",
            notification_id=view.id,
            message_id=view.message_id,
            subscription=view.subscription,
            max_attempts=view.max_attempts,
        )
        if self._on_retry is not None:
            self._on_retry()
        return {"notification": view.to_dict()}


def _number(params: dict[str, str], name: str, low: int, high: int | None) -> int | None:
    text = params.get(name)
    if not text:
        return None
    if not text.isdigit() or int(text) < low or (high is not None and int(text) > high):
        bounds = f"{low}-{high}" if high is not None else f">= {low}"
        raise HttpError(400, f"{name} must be a whole number {bounds}, got {text!r}")
    return int(text)


def _time(params: dict[str, str], name: str) -> datetime | None:
    text = params.get(name)
    if not text:
        return None
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise HttpError(
            400, f"{name} must be an ISO 8601 time like 2026-01-31T12:00:00+00:00, got {text!r}"
        ) from None
    if value.tzinfo is None:
        # A time without offset could be any zone's; guessing would shift the window.
        raise HttpError(400, f"{name} needs a UTC offset (+00:00 or Z): {text!r}")
    # In UTC: SQLite keeps UTC wall-clock times without an offset and compares them as such.
    return value.astimezone(UTC)
