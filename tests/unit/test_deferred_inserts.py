"""Which statements a batch may hold back, and the multi-row INSERT they become."""

from __future__ import annotations

import pytest

from consumer.deferred_inserts import _statement, row_insert

HEAD = "INSERT INTO effect (message_id, amount) VALUES "


@pytest.mark.parametrize(
    "sql",
    [
        HEAD + "(%(id)s, %(amount)s)",
        "insert into effect (a) values (%(a)s::INTEGER, now())",
        "INSERT INTO effect VALUES (%s, %s)",
        "INSERT INTO effect (note) VALUES ('it''s (fine)')",
        "  INSERT  INTO  s.effect (a)\n VALUES\n(%(a)s)\n",
    ],
)
def test_a_one_row_insert_that_ends_with_its_row_is_held_back(sql: str) -> None:
    split = row_insert(sql)
    assert split is not None
    head, row = split
    assert head + row == sql.rstrip()
    assert row.startswith("(")
    assert row.endswith(")")


@pytest.mark.parametrize(
    "sql",
    [
        "INSERT INTO t (a) VALUES (%(a)s) ON CONFLICT DO NOTHING",  # may insert nothing
        "INSERT INTO t (a) VALUES (%(a)s) RETURNING id",  # returns rows
        "INSERT INTO t (a) VALUES (1), (2)",  # not one row
        "INSERT INTO t (a) SELECT a FROM u",
        "INSERT INTO t (a) VALUES ((SELECT max(a) + 1 FROM t))",  # would miss held rows
        "INSERT INTO t DEFAULT VALUES",
        "WITH x AS (SELECT 1) INSERT INTO t VALUES (1)",
        "UPDATE t SET a = 1",
        "SELECT 1",
        "INSERT INTO t (a) VALUES ('100%%')",  # an escaped percent: left alone
        "INSERT INTO t (a) VALUES ('unterminated)",
        "INSERT INTO t (a) VALUES (%(odd-name)s)",  # a name that could not get a suffix
    ],
)
def test_anything_else_runs_as_usual(sql: str) -> None:
    assert row_insert(sql) is None


def test_named_parameters_get_a_suffix_per_row() -> None:
    sql, params = _statement(
        HEAD, "(%(id)s, %(amount)s::INTEGER)", [{"id": "a", "amount": 1}, {"id": "b", "amount": 2}]
    )
    assert sql == HEAD + "(%(id__0)s, %(amount__0)s::INTEGER), (%(id__1)s, %(amount__1)s::INTEGER)"
    assert params == {"id__0": "a", "amount__0": 1, "id__1": "b", "amount__1": 2}


def test_positional_parameters_are_laid_end_to_end() -> None:
    assert _statement(HEAD, "(%s, %s)", [("a", 1), ("b", 2)]) == (
        HEAD + "(%s, %s), (%s, %s)",
        ["a", 1, "b", 2],
    )


def test_a_single_row_is_sent_as_it_was() -> None:
    assert _statement(HEAD, "(%(id)s)", [{"id": "a"}]) == (HEAD + "(%(id)s)", {"id": "a"})
