"""The relay daemon: claims committed outbox rows and publishes them to RabbitMQ with confirms."""
