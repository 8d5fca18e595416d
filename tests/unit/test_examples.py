"""The README's quick start runs: its first command is the producer example."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_producer_example_commits_one_order_and_its_event_only(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "producer.py"), f"sqlite:///{tmp_path / 'e.db'}"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "orders: [(1, 'ada')]" in proc.stdout
    assert proc.stdout.count("'orders.created', 'pending'") == 1
    assert "outbox after the relay: ['published']" in proc.stdout
    assert "queue billing.orders received orders.created key=customer-ada" in proc.stdout
