"""Operator tools on PostgreSQL and SQLite: status shows where a message is; dead messages
are listed, replayed or purged, and nothing but a dead row is ever changed by them.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa
import structlog
from click.testing import CliRunner, Result
from structlog.testing import capture_logs

import outbox
from outbox import admin
from outbox.cli import cli
from outbox.errors import ConfigurationError
from outbox.tables import MessageStatus, outbox_table, receipt_table

t = outbox_table


@dataclass
class Backend:
    name: str
    engine: sa.Engine
    url: str
    """What an operator would give --database-url to reach the same tables."""

    def publish(
        self,
        topic: str = "orders.created",
        *,
        key: str | None = None,
        status: MessageStatus = MessageStatus.PENDING,
        **values: Any,
    ) -> str:
        """Publish one message, then force its row into ``status`` (and other ``values``)."""
        with self.engine.begin() as conn:
            message = outbox.publish(conn, topic, {"n": 1}, key=key)
            if status is not MessageStatus.PENDING or values:
                conn.execute(
                    sa.update(t)
                    .where(t.c.message_id == uuid.UUID(message.message_id))
                    .values(status=status.value, **values)
                )
        return message.message_id

    def dead(self, topic: str = "orders.created", **values: Any) -> str:
        """A message the relay gave up on after 12 attempts."""
        defaults: dict[str, Any] = {
            "attempts": 12,
            "last_error": "NOT_FOUND - no exchange 'outbox'",
            "claimed_by": "relay-1",
            "claimed_until": datetime.now(UTC),
        }
        return self.publish(topic, status=MessageStatus.DEAD, **{**defaults, **values})

    def receipt(self, message_id: str, group: str, outcome: str, detail: str | None = None) -> None:
        with self.engine.begin() as conn:
            conn.execute(
                receipt_table.insert().values(
                    message_id=uuid.UUID(message_id),
                    consumer_group=group,
                    outcome=outcome,
                    detail=detail,
                    recorded_at=datetime.now(UTC),
                )
            )

    def row(self, message_id: str) -> sa.Row[Any] | None:
        with self.engine.connect() as conn:
            return conn.execute(sa.select(t).where(t.c.message_id == uuid.UUID(message_id))).first()

    def statuses(self) -> dict[str, str]:
        with self.engine.connect() as conn:
            return {str(r.message_id): r.status for r in conn.execute(sa.select(t))}


@pytest.fixture(
    params=[
        pytest.param("sqlite", marks=pytest.mark.unit),
        pytest.param("postgresql", marks=pytest.mark.integration),
    ]
)
def backend(request: pytest.FixtureRequest) -> Backend:
    if request.param == "sqlite":
        engine: sa.Engine = request.getfixturevalue("sqlite_engine")
        url = engine.url.render_as_string(hide_password=False)
    else:
        engine = request.getfixturevalue("pg_engine")
        schema = request.getfixturevalue("pg_schema")
        # The schema travels in the URL as libpq's `options`, the way an operator would
        # point the CLI at a non-default schema.
        url = (
            sa.make_url(request.getfixturevalue("pg_url"))
            .update_query_dict({"options": f"-csearch_path={schema}"})
            .render_as_string(hide_password=False)
        )
    return Backend(request.param, engine, url)


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    """The CLI configures logging onto CliRunner's stream; undo it so later tests log safely."""
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    yield
    structlog.reset_defaults()
    root.handlers[:] = saved_handlers
    root.setLevel(saved_level)


# --- status ----------------------------------------------------------------------------------


def test_status_of_a_pending_message_shows_its_row_and_no_receipts(backend: Backend) -> None:
    mid = backend.publish(key="order-7")

    report = admin.message_status(backend.engine, mid)

    assert report is not None
    assert report.in_outbox
    assert report.message_id == mid
    assert (report.status, report.topic, report.key) == (
        MessageStatus.PENDING,
        "orders.created",
        "order-7",
    )
    assert (report.attempts, report.checks, report.last_error) == (0, 0, None)
    assert report.published_at is None
    assert report.claimed_by is None
    assert report.payload_bytes == len(outbox.JSON.encode({"n": 1}))
    assert report.content_type == "application/json"
    assert report.receipts == ()
    for value in (report.created_at, report.updated_at, report.next_attempt_at):
        assert value is not None
        assert value.tzinfo is not None  # UTC on SQLite too
        assert abs(datetime.now(UTC) - value) < timedelta(minutes=5)


def test_status_accepts_a_uuid_object_and_any_case(backend: Backend) -> None:
    mid = backend.publish()

    by_uuid = admin.message_status(backend.engine, uuid.UUID(mid))
    by_upper = admin.message_status(backend.engine, mid.upper())

    assert by_uuid is not None
    assert by_upper is not None
    assert by_uuid.message_id == by_upper.message_id == mid


def test_status_of_a_published_message_lists_its_receipts_oldest_first(backend: Backend) -> None:
    mid = backend.publish(
        status=MessageStatus.PUBLISHED, attempts=1, published_at=datetime.now(UTC)
    )
    backend.receipt(mid, "billing", "consumed")
    backend.receipt(mid, "shipping", "dead", "KeyError: 'address'")

    report = admin.message_status(backend.engine, mid)

    assert report is not None
    assert report.status is MessageStatus.PUBLISHED
    assert report.published_at is not None
    assert report.published_at.tzinfo is not None
    assert [(r.consumer_group, r.outcome, r.detail) for r in report.receipts] == [
        ("billing", "consumed", None),
        ("shipping", "dead", "KeyError: 'address'"),
    ]
    assert all(r.recorded_at.tzinfo is not None for r in report.receipts)


def test_status_of_a_purged_message_still_lists_its_receipts(backend: Backend) -> None:
    mid = backend.publish(status=MessageStatus.PUBLISHED)
    backend.receipt(mid, "billing", "consumed")
    with backend.engine.begin() as conn:  # what the retention purge does
        conn.execute(sa.delete(t).where(t.c.message_id == uuid.UUID(mid)))

    report = admin.message_status(backend.engine, mid)

    assert report is not None
    assert report.status is None
    assert not report.in_outbox
    assert report.topic is None
    assert [(r.consumer_group, r.outcome) for r in report.receipts] == [("billing", "consumed")]


def test_status_of_an_unknown_message_is_none(backend: Backend) -> None:
    backend.publish()
    assert admin.message_status(backend.engine, uuid.uuid4()) is None


def test_status_refuses_an_id_that_is_not_a_uuid(backend: Backend) -> None:
    with pytest.raises(ConfigurationError, match="not a UUID"):
        admin.message_status(backend.engine, "order-7")


def test_status_report_as_dict_is_json(backend: Backend) -> None:
    mid = backend.dead(headers={"tenant": "t1"})
    backend.receipt(mid, "billing", "dead", "boom")
    report = admin.message_status(backend.engine, mid)
    assert report is not None

    data = json.loads(json.dumps(report.to_dict()))

    assert data["status"] == "dead"
    assert data["in_outbox"] is True
    assert data["attempts"] == 12
    assert data["last_error"] == "NOT_FOUND - no exchange 'outbox'"
    assert datetime.fromisoformat(data["updated_at"]).tzinfo is not None
    assert data["receipts"][0]["outcome"] == "dead"


# --- list ------------------------------------------------------------------------------------


def test_list_shows_only_dead_messages_newest_first(backend: Backend) -> None:
    first = backend.dead()
    backend.publish(status=MessageStatus.PUBLISHED)
    backend.publish()
    second = backend.dead("payments.captured", key="p-1", checks=0)

    listed = admin.list_dead(backend.engine)

    assert [m.message_id for m in listed] == [second, first]
    newest = listed[0]
    assert (newest.topic, newest.key, newest.attempts) == ("payments.captured", "p-1", 12)
    assert newest.last_error == "NOT_FOUND - no exchange 'outbox'"
    assert newest.updated_at.tzinfo is not None
    assert not newest.unconfirmed


def test_list_pages_by_id_without_gaps_or_repeats(backend: Backend) -> None:
    dead = [backend.dead() for _ in range(7)]

    pages: list[list[str]] = []
    before: int | None = None
    while True:
        page = admin.list_dead(backend.engine, limit=3, before_id=before)
        if not page:
            break
        pages.append([m.message_id for m in page])
        before = page[-1].id

    assert [len(p) for p in pages] == [3, 3, 1]
    assert [mid for p in pages for mid in p] == list(reversed(dead))


def test_list_filters_by_topic(backend: Backend) -> None:
    backend.dead("orders.created")
    wanted = backend.dead("payments.captured")

    assert [m.message_id for m in admin.list_dead(backend.engine, topic="payments.captured")] == [
        wanted
    ]
    assert admin.list_dead(backend.engine, topic="nothing.here") == []


@pytest.mark.parametrize("limit", [0, -1, admin.MAX_LIST_LIMIT + 1])
def test_list_refuses_a_limit_out_of_range(backend: Backend, limit: int) -> None:
    with pytest.raises(ConfigurationError, match="limit must be between 1 and"):
        admin.list_dead(backend.engine, limit=limit)


def test_list_marks_a_half_message_that_died_of_check_backs_as_unconfirmed(
    backend: Backend,
) -> None:
    backend.dead(attempts=0, checks=15, last_error="check-back: no answer after 15 checks")

    [message] = admin.list_dead(backend.engine)

    assert message.unconfirmed
    assert message.to_dict()["unconfirmed"] is True


# --- replay ----------------------------------------------------------------------------------


def test_replay_all_makes_dead_rows_pending_and_leaves_every_other_row_alone(
    backend: Backend,
) -> None:
    dead = [backend.dead(), backend.dead("payments.captured", checks=3)]
    others = {
        backend.publish(status=MessageStatus.PUBLISHED, attempts=1): "published",
        backend.publish(): "pending",
        backend.publish(status=MessageStatus.PREPARED): "prepared",
        backend.publish(status=MessageStatus.DISCARDED): "discarded",
    }
    before = {mid: backend.row(mid) for mid in others}

    count = admin.replay_dead(backend.engine, all=True)

    assert count == 2
    for mid in dead:
        row = backend.row(mid)
        assert row is not None
        assert row.status == "pending"
        assert (row.attempts, row.checks, row.last_error) == (0, 0, None)
        assert (row.claimed_by, row.claimed_until) == (None, None)
        # Due now, so a relay picks it up on its next poll.
        assert _aware(row.next_attempt_at) <= datetime.now(UTC) + timedelta(seconds=5)
    for mid in others:
        assert backend.row(mid) == before[mid]


def test_replay_by_ids_touches_only_those_that_are_dead(backend: Backend) -> None:
    dead = backend.dead()
    other_dead = backend.dead()
    published = backend.publish(status=MessageStatus.PUBLISHED)
    pending = backend.publish()
    unknown = str(uuid.uuid4())

    count = admin.replay_dead(backend.engine, message_ids=[dead, published, pending, unknown, dead])

    assert count == 1
    assert backend.statuses() == {
        dead: "pending",
        other_dead: "dead",
        published: "published",
        pending: "pending",
    }


def test_replaying_a_published_message_is_impossible(backend: Backend) -> None:
    published = backend.publish(status=MessageStatus.PUBLISHED, attempts=1)
    before = backend.row(published)

    assert admin.replay_dead(backend.engine, message_ids=[published]) == 0
    assert admin.replay_dead(backend.engine, topic="orders.created") == 0
    assert admin.replay_dead(backend.engine, all=True) == 0
    assert backend.row(published) == before


def test_replay_by_topic(backend: Backend) -> None:
    orders = backend.dead("orders.created")
    payments = backend.dead("payments.captured")

    assert admin.replay_dead(backend.engine, topic="payments.captured") == 1

    assert backend.statuses() == {orders: "dead", payments: "pending"}


def test_replay_ids_and_topic_must_both_match(backend: Backend) -> None:
    orders = backend.dead("orders.created")
    payments = backend.dead("payments.captured")

    count = admin.replay_dead(
        backend.engine, message_ids=[orders, payments], topic="orders.created"
    )

    assert count == 1
    assert backend.statuses() == {orders: "pending", payments: "dead"}


def test_replay_logs_each_message_with_its_old_error_and_a_total(backend: Backend) -> None:
    mid = backend.dead(key="order-1")
    half = backend.dead(attempts=0, checks=15, last_error="no answer after 15 checks")

    with capture_logs() as logs:
        admin.replay_dead(backend.engine, all=True)

    per_message = {e["message_id"]: e for e in logs if e["event"] == "dead.message_replayed"}
    assert per_message[mid]["last_error"] == "NOT_FOUND - no exchange 'outbox'"
    assert per_message[mid]["key"] == "order-1"
    assert per_message[mid]["topic"] == "orders.created"
    assert per_message[mid]["unconfirmed"] is False
    # A dead half message becomes deliverable by a replay, and the log says it was unconfirmed.
    assert per_message[half]["unconfirmed"] is True
    assert backend.statuses()[half] == "pending"
    [total] = [e for e in logs if e["event"] == "dead.replayed"]
    assert total["count"] == 2
    assert total["all"] is True


def test_replay_works_in_batches_of_its_own_transactions(
    backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(admin, "BATCH_SIZE", 3)
    dead = [backend.dead() for _ in range(10)]
    published = backend.publish(status=MessageStatus.PUBLISHED)
    transactions = _count_transactions(backend.engine)

    count = admin.replay_dead(backend.engine, topic="orders.created")

    assert count == 10
    assert all(backend.statuses()[mid] == "pending" for mid in dead)
    assert backend.statuses()[published] == "published"
    assert transactions() >= 4  # 3 + 3 + 3 + 1, each committed on its own


def test_replay_by_many_ids_goes_in_batches(
    backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(admin, "BATCH_SIZE", 2)
    dead = [backend.dead() for _ in range(5)]

    assert admin.replay_dead(backend.engine, message_ids=dead) == 5


def test_replay_visits_each_row_once_even_if_it_dies_again_meanwhile(
    backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A relay could kill a replayed message again before the replay run ends; the
    # run must not chase it forever.
    monkeypatch.setattr(admin, "BATCH_SIZE", 1)
    dead = [backend.dead() for _ in range(3)]
    real_update = sa.update
    calls = 0

    def update_then_kill_again(table: Any) -> Any:
        nonlocal calls
        calls += 1
        with backend.engine.begin() as conn:
            conn.execute(real_update(t).where(t.c.status == "pending").values(status="dead"))
        return real_update(table)

    monkeypatch.setattr(admin.sa, "update", update_then_kill_again)

    assert admin.replay_dead(backend.engine, all=True) == 3
    assert calls == 3  # one UPDATE per row, then the cursor is past them all
    # The first two died again behind the cursor and wait for the next run.
    assert [backend.statuses()[mid] for mid in dead] == ["dead", "dead", "pending"]


# --- purge -----------------------------------------------------------------------------------


def test_purge_by_ids_deletes_only_dead_rows(backend: Backend) -> None:
    dead = backend.dead()
    published = backend.publish(status=MessageStatus.PUBLISHED)
    pending = backend.publish()

    count = admin.purge_dead(backend.engine, message_ids=[dead, published, pending])

    assert count == 1
    assert backend.statuses() == {published: "published", pending: "pending"}


def test_purge_by_topic(backend: Backend) -> None:
    orders = backend.dead("orders.created")
    backend.dead("payments.captured")
    published = backend.publish("payments.captured", status=MessageStatus.PUBLISHED)

    assert admin.purge_dead(backend.engine, topic="payments.captured") == 1

    assert backend.statuses() == {orders: "dead", published: "published"}


def test_purge_older_than_keeps_recently_dead_messages(backend: Backend) -> None:
    long_ago = datetime.now(UTC) - timedelta(days=10)
    old = backend.dead(updated_at=long_ago)
    recent = backend.dead()
    old_published = backend.publish(status=MessageStatus.PUBLISHED, updated_at=long_ago)

    assert admin.purge_dead(backend.engine, older_than=timedelta(days=7)) == 1

    assert old not in backend.statuses()
    assert backend.statuses() == {recent: "dead", old_published: "published"}


def test_purge_all_in_batches_keeps_other_rows_and_receipts(
    backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(admin, "BATCH_SIZE", 4)
    dead = [backend.dead() for _ in range(9)]
    backend.receipt(dead[0], "billing", "dead", "boom")
    pending = backend.publish()

    with capture_logs() as logs:
        count = admin.purge_dead(backend.engine, all=True)

    assert count == 9
    assert backend.statuses() == {pending: "pending"}
    report = admin.message_status(backend.engine, dead[0])
    assert report is not None
    assert report.status is None
    assert [e["count"] for e in logs if e["event"] == "dead.purged"] == [9]
    assert len([e for e in logs if e["event"] == "dead.message_purged"]) == 9


# --- selectors -------------------------------------------------------------------------------


@pytest.mark.parametrize("action", ["replay", "purge", "count"])
def test_no_selector_is_refused_and_changes_nothing(backend: Backend, action: str) -> None:
    mid = backend.dead()
    function = {"replay": admin.replay_dead, "purge": admin.purge_dead, "count": admin.count_dead}

    with pytest.raises(ConfigurationError, match=r"needs a selector: give message ids, a topic"):
        function[action](backend.engine)

    assert backend.statuses() == {mid: "dead"}


def test_all_together_with_another_selector_is_refused(backend: Backend) -> None:
    mid = backend.dead()

    with pytest.raises(ConfigurationError, match="already selects every dead message"):
        admin.purge_dead(backend.engine, topic="orders.created", all=True)
    with pytest.raises(ConfigurationError, match="already selects every dead message"):
        admin.replay_dead(backend.engine, message_ids=[mid], all=True)

    assert backend.statuses() == {mid: "dead"}


def test_a_single_id_where_a_list_belongs_is_refused(backend: Backend) -> None:
    mid = backend.dead()
    with pytest.raises(ConfigurationError, match="a list of ids"):
        admin.replay_dead(backend.engine, message_ids=mid)


def test_an_empty_id_list_selects_nothing(backend: Backend) -> None:
    mid = backend.dead()
    assert admin.replay_dead(backend.engine, message_ids=[]) == 0
    assert admin.purge_dead(backend.engine, message_ids=[]) == 0
    assert backend.statuses() == {mid: "dead"}


def test_a_bad_id_in_the_list_is_refused_before_anything_changes(backend: Backend) -> None:
    mid = backend.dead()
    with pytest.raises(ConfigurationError, match="not a UUID"):
        admin.purge_dead(backend.engine, message_ids=[mid, "nope"])
    assert backend.statuses() == {mid: "dead"}


def test_count_tells_how_many_and_how_many_are_unconfirmed(backend: Backend) -> None:
    backend.dead()
    backend.dead(attempts=0, checks=15)
    backend.dead("payments.captured")
    backend.publish(status=MessageStatus.PUBLISHED)

    assert admin.count_dead(backend.engine, all=True) == admin.DeadCount(total=3, unconfirmed=1)
    assert admin.count_dead(backend.engine, topic="payments.captured") == admin.DeadCount(
        total=1, unconfirmed=0
    )
    assert admin.count_dead(backend.engine, topic="none").total == 0


# --- CLI -------------------------------------------------------------------------------------


def run(backend: Backend, *args: str, input: str | None = None) -> Result:
    return CliRunner().invoke(
        cli,
        ["--log-format", "json", *args],
        env={"OUTBOX_DATABASE_URL": backend.url},
        input=input,
    )


def test_cli_status_prints_a_summary_and_exits_0(backend: Backend) -> None:
    mid = backend.dead(key="order-1")
    backend.receipt(mid, "billing", "dead", "KeyError")

    result = run(backend, "status", mid)

    assert result.exit_code == 0, result.output
    assert f"message       {mid}" in result.stdout
    assert "status        dead" in result.stdout
    assert "key           order-1" in result.stdout
    assert "last error    NOT_FOUND - no exchange 'outbox'" in result.stdout
    assert f"retry         outbox dead replay {mid}" in result.stdout
    assert "billing  dead" in result.stdout


def test_cli_status_json_is_parseable(backend: Backend) -> None:
    mid = backend.publish(status=MessageStatus.PUBLISHED)
    backend.receipt(mid, "billing", "consumed")

    result = run(backend, "status", mid, "--json")

    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["message_id"] == mid
    assert data["status"] == "published"
    assert data["receipts"][0]["consumer_group"] == "billing"


def test_cli_status_of_a_purged_message_shows_its_receipts(backend: Backend) -> None:
    mid = backend.publish()
    backend.receipt(mid, "billing", "consumed")
    with backend.engine.begin() as conn:
        conn.execute(sa.delete(t))

    result = run(backend, "status", mid)

    assert result.exit_code == 0, result.output
    assert "purged" in result.stdout
    assert "billing  consumed" in result.stdout


def test_cli_status_of_an_unknown_message_exits_1(backend: Backend) -> None:
    mid = str(uuid.uuid4())

    result = run(backend, "status", mid)

    assert result.exit_code == 1
    assert f"no message {mid} in the outbox or its receipts" in result.stderr
    assert result.stdout == ""


def test_cli_status_refuses_an_id_that_is_not_a_uuid(backend: Backend) -> None:
    result = run(backend, "status", "order-7")

    assert result.exit_code == 2
    assert "'order-7' is not a UUID" in result.stderr


def test_cli_dead_list_text_and_json(backend: Backend) -> None:
    older = backend.dead()
    newer = backend.dead("payments.captured", attempts=0, checks=15, last_error="no answer\nmore")
    backend.publish()

    text = run(backend, "dead", "list")
    page = run(backend, "dead", "list", "--json", "--limit", "1")
    rest = run(
        backend,
        "dead",
        "list",
        "--json",
        "--before-id",
        str(json.loads(page.stdout)["next_before_id"]),
    )
    filtered = run(backend, "dead", "list", "--topic", "orders.created", "--json")

    assert text.exit_code == 0, text.output
    lines = text.stdout.splitlines()
    assert lines[0].split() == [
        "ID", "MESSAGE", "ID", "TOPIC", "KEY", "ATTEMPTS", "CHECKS", "DIED", "LAST", "ERROR",
    ]  # fmt: skip
    assert newer + "*" in lines[1]
    assert "no answer" in lines[1]
    assert "more" not in lines[1]  # only the first line of the error
    assert older in lines[2]
    assert "unconfirmed half message" in text.stdout
    assert [m["message_id"] for m in json.loads(page.stdout)["messages"]] == [newer]
    assert json.loads(rest.stdout) == {
        "messages": [json.loads(filtered.stdout)["messages"][0]],
        "next_before_id": None,
    }
    assert json.loads(rest.stdout)["messages"][0]["message_id"] == older


def test_cli_dead_list_says_when_there_is_none(backend: Backend) -> None:
    result = run(backend, "dead", "list")
    assert result.exit_code == 0, result.output
    assert result.stdout == "no dead messages\n"


def test_cli_replay_by_topic_declined_at_the_prompt_changes_nothing(backend: Backend) -> None:
    mid = backend.dead()
    half = backend.dead(attempts=0, checks=15)

    result = run(backend, "dead", "replay", "--topic", "orders.created", input="n\n")

    assert result.exit_code != 0  # Abort: `outbox` itself exits 130
    assert "Replay 2 dead message(s) (topic orders.created)?" in result.stdout
    assert "1 of them are unconfirmed half messages" in result.stderr
    assert backend.statuses() == {mid: "dead", half: "dead"}


def test_cli_replay_confirmed_at_the_prompt_replays_and_logs(backend: Backend) -> None:
    mid = backend.dead()

    result = run(backend, "dead", "replay", "--all", input="y\n")

    assert result.exit_code == 0, result.output
    assert "replayed 1 dead message(s)" in result.stdout
    assert backend.statuses() == {mid: "pending"}
    events = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    [total] = [e for e in events if e["event"] == "dead.replayed"]
    assert total["count"] == 1


def test_cli_replay_by_id_needs_no_prompt_and_reports_ids_left_alone(backend: Backend) -> None:
    dead = backend.dead()
    published = backend.publish(status=MessageStatus.PUBLISHED)

    result = run(backend, "dead", "replay", dead, published)

    assert result.exit_code == 0, result.output
    assert "replayed 1 dead message(s)" in result.stdout
    assert "1 of the 2 given id(s) were not dead" in result.stderr
    assert backend.statuses() == {dead: "pending", published: "published"}


def test_cli_replay_with_nothing_matching_asks_nothing(backend: Backend) -> None:
    result = run(backend, "dead", "replay", "--all")
    assert result.exit_code == 0, result.output
    assert "no dead messages match" in result.stdout


def test_cli_purge_older_than_with_yes(backend: Backend) -> None:
    old = backend.dead(updated_at=datetime.now(UTC) - timedelta(days=8))
    recent = backend.dead()

    result = run(backend, "dead", "purge", "--older-than", "7d", "--yes")

    assert result.exit_code == 0, result.output
    assert "purged 1 dead message(s)" in result.stdout
    assert old not in backend.statuses()
    assert backend.statuses() == {recent: "dead"}
    events = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    [total] = [e for e in events if e["event"] == "dead.purged"]
    assert (total["count"], total["older_than"]) == (1, "7d")


def test_cli_purge_declined_at_the_prompt_deletes_nothing(backend: Backend) -> None:
    mid = backend.dead()

    result = run(backend, "dead", "purge", "--all", input="n\n")

    assert result.exit_code != 0
    assert "Delete 1 dead message(s) (every dead message) for good?" in result.stdout
    assert backend.statuses() == {mid: "dead"}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["dead", "replay"], "say which dead messages to replay: MESSAGE_ID..., --topic or --all"),
        (["dead", "purge"], "MESSAGE_ID..., --topic, --older-than or --all"),
        (["dead", "purge", "--all", "--topic", "x"], "--all selects every dead message"),
        (["dead", "purge", "--older-than", "7"], "'7' has no unit"),
        (["dead", "purge", "--older-than", "-1d"], "cannot be negative"),
        (["dead", "replay", "not-an-id"], "is not a UUID"),
        (["dead", "list", "--limit", "0"], "0 is not in the range"),
    ],
)
def test_cli_refuses_bad_usage_with_exit_2_and_changes_nothing(
    backend: Backend, args: list[str], message: str
) -> None:
    mid = backend.dead()

    result = run(backend, *args)

    assert result.exit_code == 2, result.output
    assert message in result.stderr
    assert backend.statuses() == {mid: "dead"}


# --- helpers ---------------------------------------------------------------------------------


def _aware(value: datetime) -> datetime:
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _count_transactions(engine: sa.Engine) -> Any:
    """Start counting committed transactions on ``engine``; return a function that reads it."""
    count = 0

    def on_commit(conn: sa.Connection) -> None:
        nonlocal count
        count += 1

    sa.event.listen(engine, "commit", on_commit)
    return lambda: count
