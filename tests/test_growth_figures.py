"""``scripts/growth_figures.py`` (the figures of docs/growing.md) runs and loses nothing."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from _helpers import json_report

if TYPE_CHECKING:
    from pgbus.server import TempCluster

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "growth_figures.py"


@pytest.mark.timeout(300)
def test_quick_run_measures_every_curve_and_loses_nothing(pg_cluster: TempCluster) -> None:
    """`--quick --json` gives every point of the three curves, with positive rates, lost = 0."""
    # pg_cluster: the script starts its own default-durability cluster from the same binaries
    report = json_report([str(SCRIPT), "--quick", "--json"], timeout=280)
    assert report["lost"] == 0
    assert report["machine"]["settings"]["fsync"] == "on"
    assert [p["listeners"] for p in report["listeners"]["raw asyncpg"]] == [1, 4]
    assert [p["listeners"] for p in report["listeners"]["plain"]] == [1, 4]
    assert [p["listeners"] for p in report["listeners"]["durable"]] == [1, 2]
    for points in report["listeners"].values():
        for p in points:
            assert p["deliveries_per_s"] == pytest.approx(p["events_per_s"] * p["listeners"])
            assert 0 < p["p50_ms"] <= p["p99_ms"]
    assert [p["writers"] for p in report["commits"]] == [1, 4]
    for p in report["commits"]:
        assert min(p["insert"], p["plain"], p["durable"]) > 0
    for side in ("plain", "durable"):
        assert [p["subscriptions"] for p in report["fanout"][side]] == [1, 2]
        assert all(p["events_per_s"] > 0 for p in report["fanout"][side])
