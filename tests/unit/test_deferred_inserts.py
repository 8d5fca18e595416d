"""Which statements a batch may hold back, and the multi-row INSERT they become."""

from __future__ import annotations

import psycopg
import pytest

from consumer.deferred_inserts import _native_sql, _statement, row_insert

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
        "INSERT INTO t (a) VALUES (%(odd-name)s)",  # not a placeholder psycopg reads
        "INSERT INTO t (a, b) VALUES (%(a)s, %s)",  # named and positional: psycopg refuses
        "INSERT INTO t (a) VALUES (%b)",  # a binary placeholder: the rows could not keep it
        "INSERT INTO t (a) VALUES ('50%')",  # a stray percent sign
        "INSERT INTO t (a) VALUES ($1)",  # PostgreSQL's own placeholders already
        "INSERT INTO t (a) VALUES ($$text$$)",
    ],
)
def test_anything_else_runs_as_usual(sql: str) -> None:
    assert row_insert(sql) is None


def test_named_parameters_are_numbered_per_row_and_a_repeated_name_is_one_parameter() -> None:
    sql, values = _statement(
        HEAD,
        "(%(id)s, %(amount)s::INTEGER, %(id)s)",
        [{"id": "a", "amount": 1, "unused": 0}, {"id": "b", "amount": 2}],
    )
    assert sql == HEAD + "($1, $2::INTEGER, $1), ($3, $4::INTEGER, $3)"
    assert values == ["a", 1, "b", 2]


def test_positional_parameters_are_laid_end_to_end() -> None:
    assert _statement(HEAD, "(%s, now(), %s)", [("a", 1), ["b", 2]]) == (
        HEAD + "($1, now(), $2), ($3, now(), $4)",
        ["a", 1, "b", 2],
    )


def test_a_single_row_and_a_row_without_parameters() -> None:
    assert _statement(HEAD, "(%(id)s)", [{"id": "a"}]) == (HEAD + "($1)", ["a"])
    assert _statement(HEAD, "(1, 'x')", [(), ()]) == (HEAD + "(1, 'x'), (1, 'x')", [])


def test_parameters_that_do_not_fit_the_row_raise_psycopgs_error() -> None:
    with pytest.raises(psycopg.ProgrammingError, match="parameter missing: amount"):
        _statement(HEAD, "(%(id)s, %(amount)s)", [{"id": "a", "amount": 1}, {"id": "b"}])
    with pytest.raises(psycopg.ProgrammingError, match="2 placeholders but 1 parameters"):
        _statement(HEAD, "(%s, %s)", [("a", 1), ("b",)])


def test_a_very_long_statement_is_made_but_not_kept() -> None:
    before = _native_sql.cache_info().currsize
    sql, values = _statement(HEAD, "(%s)", [(i,) for i in range(1500)])
    assert sql.endswith("($1499), ($1500)")
    assert values == list(range(1500))
    assert _native_sql.cache_info().currsize == before
