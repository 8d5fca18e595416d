"""The billing service's own table."""

from __future__ import annotations

from django.db import models


class Invoice(models.Model):
    """The invoice of one order, made from the shop's ``orders.created`` message."""

    # Unique as a business rule (one invoice per order). Redelivered messages never
    # reach it: the consumer's inbox row recognises them first.
    order_id = models.BigIntegerField(unique=True)
    customer = models.CharField(max_length=100)
    amount_cents = models.PositiveIntegerField()
    message_id = models.UUIDField(help_text="The orders.created message it was made from.")
    created_at = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return f"invoice for order {self.order_id}: {self.amount_cents} cents"
