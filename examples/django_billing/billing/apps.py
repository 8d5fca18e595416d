"""The billing app's configuration."""

from __future__ import annotations

from django.apps import AppConfig


class BillingConfig(AppConfig):
    """Invoices, written by the ``orders.created`` consumer in ``billing.consumers``."""

    name = "billing"
    default_auto_field = "django.db.models.BigAutoField"
