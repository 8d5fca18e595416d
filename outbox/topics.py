"""Topic names and RabbitMQ topic patterns, shared by producers, the relay and consumers."""

from __future__ import annotations

import re

__all__ = ["MAX_TOPIC_LENGTH", "topic_matches", "validate_pattern", "validate_topic"]

MAX_TOPIC_LENGTH = 255  # AMQP routing keys are short strings of at most 255 bytes

_WORD = r"[A-Za-z0-9_\-]+"
_TOPIC_RE = re.compile(rf"{_WORD}(?:\.{_WORD})*")
_PATTERN_RE = re.compile(rf"(?:{_WORD}|\*|#)(?:\.(?:{_WORD}|\*|#))*")


def validate_topic(topic: object) -> str:
    """Return ``topic`` if it is a valid topic name, else raise ``ValueError`` saying why.

    A topic is one or more dot-separated words of letters, digits, ``_`` and ``-``
    (``orders.created``); it becomes the AMQP routing key, so wildcards are not allowed.
    """
    if not isinstance(topic, str):
        raise ValueError(f"topic must be a str, not {type(topic).__name__}")
    if not topic:
        raise ValueError("topic must not be empty; use dot-separated words like 'orders.created'")
    if len(topic.encode()) > MAX_TOPIC_LENGTH:
        raise ValueError(f"topic is longer than {MAX_TOPIC_LENGTH} bytes")
    if _TOPIC_RE.fullmatch(topic) is None:
        raise ValueError(
            f"topic {topic!r} is malformed; use dot-separated words of letters, digits, "
            "'_' and '-' (like 'orders.created'), without spaces or wildcards"
        )
    return topic


def validate_pattern(pattern: object) -> str:
    """Return ``pattern`` if it is a valid RabbitMQ topic pattern (``*`` one word, ``#`` any)."""
    if not isinstance(pattern, str) or not pattern:
        raise ValueError("a topic pattern must be a non-empty str like 'orders.*' or 'orders.#'")
    if len(pattern.encode()) > MAX_TOPIC_LENGTH or _PATTERN_RE.fullmatch(pattern) is None:
        raise ValueError(
            f"topic pattern {pattern!r} is malformed; use dot-separated words, '*' for exactly "
            "one word and '#' for zero or more words"
        )
    return pattern


def topic_matches(pattern: str, topic: str) -> bool:
    """Tell whether ``topic`` matches the RabbitMQ topic ``pattern``, as a topic exchange would."""
    words = topic.split(".")
    # reachable[j]: the pattern words seen so far can match exactly the first j topic words.
    reachable = [True] + [False] * len(words)
    for p in pattern.split("."):
        if p == "#":
            # '#' takes zero or more words: once j is reachable, every later j is too.
            for j in range(1, len(reachable)):
                reachable[j] = reachable[j] or reachable[j - 1]
        else:
            for j in range(len(words), 0, -1):
                reachable[j] = reachable[j - 1] and (p == "*" or p == words[j - 1])
            reachable[0] = False
    return reachable[-1]
