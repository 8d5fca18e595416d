"""The billing service's consumer group: one invoice for every ``orders.created`` message.

Run it with this folder on the import path::

    outbox consume billing.consumers:consumer

The handler runs with Django's ORM inside ``transaction.atomic()``, together with
the group's inbox row: a message delivered twice makes one invoice, and a handler
that fails leaves neither the invoice nor the inbox row behind.
"""

from __future__ import annotations

import os

import django
from django.conf import settings

from consumer import Consumer, ConsumerConfig, IncomingMessage, Reject

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "billing_site.settings")
# Django must be set up before the models are imported and before the worker starts.
django.setup()

from billing.models import Invoice  # noqa: E402

consumer = Consumer(
    "billing",
    database_url=settings.OUTBOX_DATABASE_URL,
    amqp_url=settings.OUTBOX_AMQP_URL,
    config=ConsumerConfig(
        exchange=settings.OUTBOX_EXCHANGE, queue_prefix=settings.OUTBOX_QUEUE_PREFIX
    ),
)


@consumer.handler("orders.created", django=True)
def create_invoice(message: IncomingMessage) -> None:
    """Write the invoice of the order ``message`` announces.

    A payload without the fields an invoice needs can never succeed, so it is
    dead-lettered at once (``Reject``) instead of being retried.
    """
    order = message.payload
    try:
        order_id, customer, total = order["order_id"], order["customer"], order["total_cents"]
    except (KeyError, TypeError):
        raise Reject(f"not an orders.created payload: {sorted(order)!r}") from None
    Invoice.objects.create(
        order_id=order_id,
        customer=customer,
        amount_cents=total,
        message_id=message.message_id,
    )
