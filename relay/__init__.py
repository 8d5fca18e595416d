"""The relay daemon: claims committed outbox rows and publishes them to RabbitMQ with confirms.

Run it with ``outbox relay``, or embed it::

    async with Relay(RelayConfig(database_url=..., amqp_url=...)):
        ...
"""

from __future__ import annotations

from relay.config import RelayConfig, UnroutablePolicy
from relay.relay import Relay

__all__ = ["Relay", "RelayConfig", "UnroutablePolicy"]
