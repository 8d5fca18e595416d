"""``python -m outbox`` runs the ``outbox`` command."""

from outbox.cli import main

main()
