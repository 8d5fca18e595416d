"""Topic names and patterns follow RabbitMQ topic exchange rules."""

from __future__ import annotations

import itertools

import pytest

from outbox.topics import MAX_TOPIC_LENGTH, topic_matches, validate_pattern, validate_topic

# --- validate_topic -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "topic",
    [
        "orders",
        "orders.created",
        "orders.eu-west.created",
        "Orders_V2.created",
        "a.b.c.d.e.f.g.h",
        "0.1.2",
        "a" * MAX_TOPIC_LENGTH,
        ".".join(["ab"] * 85),  # 254 bytes
    ],
)
def test_valid_topic_is_returned_unchanged(topic: str) -> None:
    assert validate_topic(topic) == topic


@pytest.mark.parametrize(
    ("topic", "reason"),
    [
        ("", "must not be empty"),
        ("orders created", "malformed"),
        (" orders", "malformed"),
        ("orders.created\n", "malformed"),
        ("orders.*", "malformed"),
        ("orders.#", "malformed"),
        ("*", "malformed"),
        ("#", "malformed"),
        ("orders..created", "malformed"),
        (".orders", "malformed"),
        ("orders.", "malformed"),
        (".", "malformed"),
        ("orders/created", "malformed"),
        ("bestellungen.größe", "malformed"),
        ("a" * (MAX_TOPIC_LENGTH + 1), "longer than 255 bytes"),
        # 128 characters but 256 bytes: the limit is on the encoded routing key.
        ("é" * 128, "longer than 255 bytes"),
    ],
)
def test_invalid_topic_is_refused_with_the_reason(topic: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        validate_topic(topic)


@pytest.mark.parametrize("topic", [None, 1, b"orders.created", ["orders"]])
def test_topic_that_is_not_a_str_is_refused(topic: object) -> None:
    with pytest.raises(ValueError, match="topic must be a str"):
        validate_topic(topic)


# --- validate_pattern -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "pattern",
    [
        "orders.created",
        "orders.*",
        "orders.#",
        "*",
        "#",
        "#.#",
        "*.created",
        "#.created",
        "orders.*.created",
        "orders.#.created",
        "*.*.*",
        "a" * MAX_TOPIC_LENGTH,
    ],
)
def test_valid_pattern_is_returned_unchanged(pattern: str) -> None:
    assert validate_pattern(pattern) == pattern


@pytest.mark.parametrize(
    "pattern",
    [
        "",
        "orders..created",
        ".orders",
        "orders.",
        "orders*",
        "orders.cre*",
        "orders#",
        "**",
        "##",
        "orders created",
        "orders.>",  # AMQP 1.0 / MQTT style wildcards are not RabbitMQ topic patterns
        "orders.+",
        "a" * (MAX_TOPIC_LENGTH + 1),
        None,
        3,
    ],
)
def test_invalid_pattern_is_refused(pattern: object) -> None:
    with pytest.raises(ValueError, match="pattern"):
        validate_pattern(pattern)


# --- topic_matches --------------------------------------------------------------------------

MATCHES = [
    # exact words
    ("orders.created", "orders.created", True),
    ("orders.created", "orders.updated", False),
    ("orders.created", "orders", False),
    ("orders", "orders.created", False),
    # '*' is exactly one word
    ("orders.*", "orders.created", True),
    ("orders.*", "orders", False),
    ("orders.*", "orders.created.eu", False),
    ("*.created", "orders.created", True),
    ("*.created", "created", False),
    ("orders.*.created", "orders.eu.created", True),
    ("orders.*.created", "orders.created", False),
    ("orders.*.created", "orders.eu.west.created", False),
    ("*", "orders", True),
    ("*", "orders.created", False),
    ("*.*", "orders.created", True),
    ("*.*", "orders", False),
    # '#' at the end: zero or more words
    ("orders.#", "orders", True),
    ("orders.#", "orders.created", True),
    ("orders.#", "orders.created.eu.west", True),
    ("orders.#", "payments.created", False),
    ("orders.#", "ordersx.created", False),
    # '#' at the start
    ("#.created", "created", True),
    ("#.created", "orders.created", True),
    ("#.created", "eu.orders.created", True),
    ("#.created", "orders.created.late", False),
    # '#' in the middle
    ("orders.#.created", "orders.created", True),
    ("orders.#.created", "orders.eu.created", True),
    ("orders.#.created", "orders.eu.west.created", True),
    ("orders.#.created", "orders.eu.west", False),
    ("orders.#.created", "payments.eu.created", False),
    # '#' alone and doubled
    ("#", "orders", True),
    ("#", "orders.created.eu", True),
    ("#.#", "orders", True),
    ("#.#", "orders.created.eu", True),
    # mixed
    ("#.*", "orders", True),
    ("*.#", "orders", True),
    ("*.#.*", "orders", False),
    ("*.#.*", "orders.created", True),
    ("#.orders.#", "orders", True),
    ("#.orders.#", "eu.orders.created", True),
    ("#.orders.#", "eu.payments.created", False),
    ("a.#.b.#.c", "a.b.c", True),
    ("a.#.b.#.c", "a.x.b.y.z.c", True),
    ("a.#.b.#.c", "a.x.c.b", False),
    # case matters, as in RabbitMQ
    ("orders.*", "Orders.created", False),
]


@pytest.mark.parametrize(("pattern", "topic", "expected"), MATCHES)
def test_topic_matches_like_a_rabbitmq_topic_exchange(
    pattern: str, topic: str, expected: bool
) -> None:
    assert topic_matches(pattern, topic) is expected


def _reference_match(pattern: list[str], topic: list[str]) -> bool:
    """The topic exchange rules written as plainly as possible, to check against."""
    if not pattern:
        return not topic
    head, rest = pattern[0], pattern[1:]
    if head == "#":
        return _reference_match(rest, topic) or (
            bool(topic) and _reference_match(pattern, topic[1:])
        )
    return bool(topic) and head in ("*", topic[0]) and _reference_match(rest, topic[1:])


def test_topic_matches_agrees_with_the_reference_rules_on_every_short_pattern() -> None:
    patterns = [p for n in range(1, 5) for p in itertools.product(["a", "b", "*", "#"], repeat=n)]
    topics = [t for n in range(1, 5) for t in itertools.product(["a", "b"], repeat=n)]
    disagreements = [
        (".".join(p), ".".join(t))
        for p in patterns
        for t in topics
        if topic_matches(".".join(p), ".".join(t)) != _reference_match(list(p), list(t))
    ]
    assert disagreements == []
