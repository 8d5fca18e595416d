#!/usr/bin/env python
"""Django's command-line utility for the billing example (``python manage.py migrate``)."""

from __future__ import annotations

import os
import sys


def main() -> None:
    """Run a management command with this project's settings."""
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "billing_site.settings")
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)


if __name__ == "__main__":
    main()
