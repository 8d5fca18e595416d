"""What ``outbox demo`` must report, shared by its unit and integration tests."""

from __future__ import annotations

import re

EXPECTED = {
    "messages published by the relay": 6,
    "messages handled (one effect each)": 4,
    "duplicates absorbed by the inbox": 1,
    "handler retries": 4,
    "dead-lettered": 1,
    "half messages resolved by check-back": 2,
    "partner notifications delivered": 1,
    "partner calls made": 2,
}


def summary_of(output: str) -> dict[str, int]:
    """The summary table the demo ends with, as numbers."""
    rows = re.findall(r"^\| (.+?)\s+\|\s+(\d+) \|$", output, re.MULTILINE)
    return {name: int(value) for name, value in rows}
