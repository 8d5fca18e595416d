"""The best-effort notification service: subscribed messages, signed HTTP calls, a schedule.

::

    from consumer.notify import NotifyService, load_config

    service = NotifyService(load_config("notify.toml"), database_url=..., amqp_url=...)
    service.run()  # or: outbox notify --config notify.toml

Receivers check a call with ``verify`` (docs/notify.md shows it without this package).
"""

from __future__ import annotations

from consumer.notify.config import NotifyConfig, Subscription, load_config
from consumer.notify.service import NotifyService
from consumer.notify.signature import encode_body, request_headers, sign, verify

__all__ = [
    "NotifyConfig",
    "NotifyService",
    "Subscription",
    "encode_body",
    "load_config",
    "request_headers",
    "sign",
    "verify",
]
