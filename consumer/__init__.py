"""The consumer library: handlers that apply each message exactly once through the inbox table.

::

    from consumer import Consumer, Retry, Reject

    consumer = Consumer("billing", database_url=..., amqp_url=...)

    @consumer.handler("orders.created")
    def on_order_created(message, session): ...

Run it with ``outbox consume myapp.consumers:consumer`` or ``consumer.run()``.
"""

from __future__ import annotations

from consumer.config import ConsumerConfig, Exhausted
from consumer.consumer import Consumer
from consumer.message import IncomingMessage
from consumer.signals import Reject, Retry

__all__ = ["Consumer", "ConsumerConfig", "Exhausted", "IncomingMessage", "Reject", "Retry"]
