"""The web shop example: a Flask service that publishes ``orders.created`` with each order."""
