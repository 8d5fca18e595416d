"""Message ids: UUIDv7, strictly increasing in this process, unique across threads."""

from __future__ import annotations

import itertools
import threading
import time
import uuid
from types import SimpleNamespace

import pytest

from outbox import ids
from outbox.ids import new_message_id, new_message_uuid, normalize_message_id


def _unix_ms(u: uuid.UUID) -> int:
    return u.int >> 80


def test_new_message_uuid_is_version_7_with_rfc_variant() -> None:
    for _ in range(100):
        u = new_message_uuid()
        assert u.version == 7
        assert u.variant == uuid.RFC_4122


def test_new_message_id_is_the_canonical_string_of_a_uuid7() -> None:
    text = new_message_id()
    assert text == str(uuid.UUID(text))
    assert uuid.UUID(text).version == 7


def test_timestamp_bits_are_the_current_unix_milliseconds() -> None:
    before = time.time_ns() // 1_000_000
    u = new_message_uuid()
    after = time.time_ns() // 1_000_000
    # Earlier ids may have pushed the counter ahead by a millisecond at most in practice.
    assert before - 1 <= _unix_ms(u) <= after + 1


def test_ids_are_strictly_increasing_across_many_calls() -> None:
    made = [new_message_uuid() for _ in range(20_000)]
    # 20k ids take a few milliseconds, so many share one: the increment must keep order.
    assert len({_unix_ms(u) for u in made}) < len(made)
    assert all(a.int < b.int for a, b in itertools.pairwise(made))
    assert all(a.bytes < b.bytes for a, b in itertools.pairwise(made))
    # The canonical strings sort the same way, so text columns are time-ordered too.
    assert [str(u) for u in made] == sorted(str(u) for u in made)


def test_ids_made_within_one_millisecond_are_strictly_increasing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Given a clock that stands still (ahead of every id made so far)
    frozen_ns = max(time.time_ns(), (ids._last_ms + 1) * 1_000_000)
    monkeypatch.setattr(ids, "time", SimpleNamespace(time_ns=lambda: frozen_ns))
    # When many ids are made
    made = [new_message_uuid() for _ in range(5_000)]
    # Then they all carry that millisecond and still increase, by one step each
    assert {_unix_ms(u) for u in made} == {frozen_ns // 1_000_000}
    assert all(b.int - a.int == 1 for a, b in itertools.pairwise(made))
    assert all(u.version == 7 and u.variant == uuid.RFC_4122 for u in made)


def test_ids_keep_increasing_when_the_clock_steps_back(monkeypatch: pytest.MonkeyPatch) -> None:
    first = new_message_uuid()
    earlier_ns = (_unix_ms(first) - 5_000) * 1_000_000  # five seconds in the past
    monkeypatch.setattr(ids, "time", SimpleNamespace(time_ns=lambda: earlier_ns))
    second = new_message_uuid()
    third = new_message_uuid()
    assert first.int < second.int < third.int
    assert _unix_ms(second) == _unix_ms(first)


def test_ids_are_unique_across_threads() -> None:
    per_thread = 5_000
    results: list[list[uuid.UUID]] = [[] for _ in range(8)]
    start = threading.Barrier(len(results))

    def make(out: list[uuid.UUID]) -> None:
        start.wait()
        out.extend(new_message_uuid() for _ in range(per_thread))

    threads = [threading.Thread(target=make, args=(out,)) for out in results]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    everything = [u for out in results for u in out]
    assert len(everything) == 8 * per_thread
    assert len(set(everything)) == len(everything)
    # Each thread sees its own ids increase, since all draw from one locked counter.
    for out in results:
        assert all(a.int < b.int for a, b in itertools.pairwise(out))


def test_normalize_message_id_accepts_a_uuid_object() -> None:
    u = uuid.uuid4()
    assert normalize_message_id(u) == str(u)


@pytest.mark.parametrize(
    "text",
    [
        "0190f3c4-8a4b-7c2d-9e1f-123456789abc",
        "0190F3C4-8A4B-7C2D-9E1F-123456789ABC",
        "0190f3c48a4b7c2d9e1f123456789abc",
    ],
    ids=["canonical", "upper-case", "no-dashes"],
)
def test_normalize_message_id_returns_the_canonical_lower_case_form(text: str) -> None:
    assert normalize_message_id(text) == "0190f3c4-8a4b-7c2d-9e1f-123456789abc"


@pytest.mark.parametrize(
    "garbage",
    [
        "",
        "not-a-uuid",
        "1234",
        "0190f3c4-8a4b-7c2d-9e1f-123456789ab",  # one digit short
        "0190f3c4-8a4b-7c2d-9e1f-123456789abcd",  # one digit long
        "g190f3c4-8a4b-7c2d-9e1f-123456789abc",  # not hex
    ],
)
def test_normalize_message_id_rejects_strings_that_are_not_uuids(garbage: str) -> None:
    with pytest.raises(ValueError, match="is not a UUID"):
        normalize_message_id(garbage)


@pytest.mark.parametrize(
    "wrong",
    [None, 42, uuid.uuid4().bytes, uuid.uuid4().int, ["x"]],
    ids=lambda v: type(v).__name__,
)
def test_normalize_message_id_rejects_other_types_with_value_error(wrong: object) -> None:
    with pytest.raises(ValueError, match=r"must be a uuid\.UUID or a UUID string"):
        normalize_message_id(wrong)
