"""Where the benchmarks write their figures: one JSON file each under benchmarks/results/."""

from __future__ import annotations

import json
import os
from typing import Any

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def results_path(name: str) -> str:
    """benchmarks/results/`name`."""
    return os.path.join(RESULTS_DIR, name)


def write_results(path: str, report: dict[str, Any]) -> None:
    """`report` as indented JSON at `path` (its folder made if need be), and a line saying where."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(report, f, indent=2)
    print(f"wrote {path}")
