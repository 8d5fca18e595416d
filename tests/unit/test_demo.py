"""``outbox demo`` on the embedded default, and the README's quick start that runs it."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

from demo_support import EXPECTED, summary_of

ROOT = Path(__file__).resolve().parents[2]


def quick_start() -> list[str]:
    """The commands of the README's quick-start block."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Quick start", 1)[1]
    block = re.search(r"```sh\n(.*?)```", section, re.DOTALL)
    assert block is not None, "the quick start has no ```sh block"
    return [line for line in block.group(1).splitlines() if line.strip()]


def test_demo_tells_the_whole_story_on_the_embedded_default() -> None:
    outbox = Path(sys.executable).with_name("outbox")
    proc = subprocess.run(
        [str(outbox), "demo", "--pace", "0"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert summary_of(proc.stdout) == EXPECTED
    assert "broker:   in-memory" in proc.stdout
    assert "8. A partner is notified over HTTP" in proc.stdout
    assert proc.stderr == ""  # no log noise in the story unless --logs


def test_quick_start_is_two_commands_demo_then_the_ci_test_command() -> None:
    first, second, *rest = quick_start()
    assert rest == []
    assert first.startswith("python3 -m venv .venv && ")
    assert shlex.split(first)[-2:] == [".venv/bin/outbox", "demo"]
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    runs = [line.strip() for line in ci if line.strip().endswith(second)]
    assert runs, f".ci/run does not run the README's test command {second!r}"
    assert all(line in (second, f"CI=true {second}") for line in runs), runs
