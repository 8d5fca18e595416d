"""The Django app: add ``"outbox.django"`` to ``INSTALLED_APPS`` and run ``migrate outbox``."""

from __future__ import annotations

from django.apps import AppConfig

__all__ = ["OutboxConfig"]


class OutboxConfig(AppConfig):
    """The ``outbox`` app: the outbox, inbox and receipt tables, migrated by Django."""

    name = "outbox.django"
    # "outbox", not "django": the label names the app in migrate and in the migration graph.
    label = "outbox"
    verbose_name = "Outbox"
    default_auto_field = "django.db.models.BigAutoField"
