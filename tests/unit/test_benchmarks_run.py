"""benchmarks/run: the summary table keeps the rows of benchmarks a run did not measure."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "run"


@pytest.fixture
def run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    loader = importlib.machinery.SourceFileLoader("benchmarks_run", str(SCRIPT))
    spec = importlib.util.spec_from_loader("benchmarks_run", loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    monkeypatch.setattr(module, "DOC", tmp_path / "performance.md")
    monkeypatch.setattr(module, "DATA", tmp_path / "performance.json")
    return module


def report(benchmark: str, name: str, value: float) -> dict[str, Any]:
    figure = {
        "name": name,
        "value": value,
        "unit": "msg/s",
        "baseline_name": "raw",
        "baseline": 1000.0,
        "ratio": value / 1000,
        "target": 0.7,
        "lower_is_better": False,
        "met": value / 1000 >= 0.7,
        "note": "",
    }
    return {
        "benchmark": benchmark,
        "finished_at": "2026-11-21 12:00:00",
        "machine": {"cpus": 2, "load": [1.0, 1.0, 1.0]},
        "figures": [figure],
    }


def test_only_replaces_the_rows_of_the_benchmarks_it_ran(
    run: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    run.DOC.write_text(
        f"# Performance\n\n{run.BEGIN}\n\n| figure | value |\n|---|---|\n"
        "| producer: old row | 1 tx/s |\n| relay drain, old row | 2 msg/s |\n"
        f"| consumer: old row | 3 msg/s |\n\n{run.END}\n\nProse stays.\n"
    )
    reports = {"consumer": report("consumer", "consumer: new row", 800.0)}

    def fake_call(command: list[str], cwd: Path) -> int:
        name = next(n for n, (script, _, _) in run.BENCHMARKS.items() if script in command[1])
        Path(command[-1]).write_text(json.dumps(reports[name]))
        return 0

    monkeypatch.setattr(run.subprocess, "call", fake_call)
    assert run.main(["--only", "consumer"]) == 0
    text = run.DOC.read_text()
    assert "| producer: old row |" in text
    assert "| relay drain, old row |" in text
    assert "consumer: old row" not in text
    assert "| consumer: new row | 800 msg/s | raw: 1,000 msg/s | 0.80 | ≥ 0.7 (met) |" in text
    assert text.endswith("Prose stays.\n")
    assert json.loads(run.DATA.read_text())["consumer"]["figures"][0]["value"] == 800.0

    # A later run of another benchmark keeps the consumer's report from the JSON file.
    reports["relay"] = report("relay", "relay drain, new row", 900.0)
    assert run.main(["--only", "relay"]) == 0
    text = run.DOC.read_text()
    assert "| consumer: new row |" in text
    assert "| relay drain, new row |" in text
    assert "relay drain, old row" not in text
    assert "| producer: old row |" in text
