"""The inbox rows of a batch: the same answer whichever statement writes them."""

from __future__ import annotations

import uuid

import sqlalchemy as sa

from consumer.inbox import inbox_insert_batch
from outbox.tables import inbox_table


def test_a_batch_gets_back_only_its_new_ids_on_either_path(engine: sa.Engine) -> None:
    # On PostgreSQL with psycopg the batch is one fixed SQL text; a connection with a
    # schema_translate_map (here an identity one) gets SQLAlchemy's Core INSERT instead.
    a, b, c = (str(uuid.uuid4()) for _ in range(3))
    translated = engine.execution_options(schema_translate_map={None: None})
    with engine.begin() as conn:
        assert inbox_insert_batch(conn, "billing", [(a, "orders.created")] * 2) == {a}
    with translated.begin() as conn:
        assert inbox_insert_batch(conn, "billing", [(a, "x"), (b, "orders.paid")]) == {b}
    with engine.begin() as conn:
        assert inbox_insert_batch(conn, "billing", [(b, "x"), (c, "orders.sent")]) == {c}
        assert inbox_insert_batch(conn, "audit", [(a, "orders.created")]) == {a}
        rows = conn.execute(
            sa.select(inbox_table.c.consumer_group, inbox_table.c.message_id, inbox_table.c.topic)
        ).all()
    assert sorted((g, str(m), t) for g, m, t in rows) == sorted(
        [
            ("billing", a, "orders.created"),
            ("billing", b, "orders.paid"),
            ("billing", c, "orders.sent"),
            ("audit", a, "orders.created"),
        ]
    )


def test_the_batch_arrays_keep_any_text_as_it_was(engine: sa.Engine) -> None:
    topics = ["NULL", 'quote"d', "back\\slash", "ä {,} ", ""]
    ids = [str(uuid.uuid4()) for _ in topics]
    with engine.begin() as conn:
        assert inbox_insert_batch(conn, "odd", []) == set()
        assert inbox_insert_batch(conn, "odd", list(zip(ids, topics, strict=True))) == set(ids)
        rows = conn.execute(
            sa.select(inbox_table.c.message_id, inbox_table.c.topic).where(
                inbox_table.c.consumer_group == "odd"
            )
        ).all()
    assert sorted((str(m), t) for m, t in rows) == sorted(zip(ids, topics, strict=True))
