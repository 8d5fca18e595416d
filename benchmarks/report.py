"""Machine-readable results of the benchmarks, for ``benchmarks/run``.

Each benchmark script takes ``--json PATH`` and writes one document: its name,
when and where it ran, and a list of figures. A figure is one measured number
with the raw baseline it is compared against in the same run, their ratio, and
the issue's target for that ratio (if there is one).
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Figure", "write_json"]


@dataclass
class Figure:
    """One measured figure against its baseline."""

    name: str
    value: float
    unit: str
    baseline_name: str | None = None
    baseline: float | None = None
    target: float | None = None
    """The least acceptable ``ratio`` (``lower_is_better``: the most acceptable value)."""
    lower_is_better: bool = False
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ratio(self) -> float | None:
        if self.baseline in (None, 0) or self.lower_is_better:
            return None
        return self.value / self.baseline  # type: ignore[operator]

    @property
    def met(self) -> bool | None:
        if self.target is None:
            return None
        if self.lower_is_better:
            return self.value <= self.target
        return self.ratio is not None and self.ratio >= self.target


def write_json(path: str | Path, benchmark: str, figures: list[Figure], **context: Any) -> None:
    """Write the results of ``benchmark`` to ``path`` (see the module docstring)."""
    document = {
        "benchmark": benchmark,
        "finished_at": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "system": f"{platform.system()} {platform.release()}",
            "load": [round(x, 2) for x in os.getloadavg()],
        },
        "context": context,
        "figures": [{**asdict(f), "ratio": f.ratio, "met": f.met} for f in figures],
    }
    Path(path).write_text(json.dumps(document, indent=2, default=str) + "\n")
