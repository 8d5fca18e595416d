"""Settings of the billing example, read from the same variables as the ``outbox`` commands.

``OUTBOX_DATABASE_URL`` is the billing service's own database (default: the
``billing`` database of deploy/docker-compose.yml); it holds the invoices, the
consumer's inbox and the framework's other tables, all created by
``python manage.py migrate``. ``OUTBOX_AMQP_URL``, ``OUTBOX_EXCHANGE`` and
``OUTBOX_QUEUE_PREFIX`` say where the consumer finds its messages.
"""

from __future__ import annotations

import os
from typing import Any

import sqlalchemy as sa

OUTBOX_DATABASE_URL = os.environ.get(
    "OUTBOX_DATABASE_URL", "postgresql://app:app@127.0.0.1:5432/billing"
)
OUTBOX_AMQP_URL = os.environ.get("OUTBOX_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
OUTBOX_EXCHANGE = os.environ.get("OUTBOX_EXCHANGE", "outbox")
OUTBOX_QUEUE_PREFIX = os.environ.get("OUTBOX_QUEUE_PREFIX", "outbox")


def database(url: str) -> dict[str, Any]:
    """Django's DATABASES entry for a URL the outbox commands also take.

    The consumer opens its own SQLAlchemy engine on the same URL, so Django and the
    consumer must agree on the database: one URL, read here, keeps them so.
    """
    parsed = sa.make_url(url)
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        return {"ENGINE": "django.db.backends.sqlite3", "NAME": parsed.database or ":memory:"}
    if backend != "postgresql":
        raise ValueError(f"the billing example runs on PostgreSQL or SQLite, not {backend}")
    entry: dict[str, Any] = {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": parsed.database or "",
        "USER": parsed.username or "",
        "PASSWORD": parsed.password or "",
        "HOST": parsed.host or "",
        "PORT": str(parsed.port or ""),
    }
    if "options" in parsed.query:  # such as -csearch_path=billing: passed on to libpq
        entry["OPTIONS"] = {"options": parsed.query["options"]}
    return entry


DATABASES = {"default": database(OUTBOX_DATABASE_URL)}

INSTALLED_APPS = ["outbox.django", "billing"]

# No pages are served; Django still wants a key for its signing utilities.
SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "billing-example-serves-no-pages")
USE_TZ = True
TIME_ZONE = "UTC"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
