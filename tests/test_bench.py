"""``pgbus bench`` runs every scenario and loses nothing (no assertions about speed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from _helpers import json_report
from click.testing import CliRunner

from pgbus import bench
from pgbus.cli._common import State
from pgbus.cli.bench import bench as bench_command

RECEIVING = {
    "durable_latency_1k",
    "durable_latency_tx",
    "durable_rows",
    "receive",
    "receive_metrics",
    "receive_batch",
    "receive_dashboard",
    "otel_metrics",
    "otel_unsampled",
    "otel_sampled",
    "latency_1k",
    "latency_5k",
    "request",
    "fanout",
    "memory",
    "durable_receive",
    "relay_nats",
    "relay_nats_latency_1k",
    "relay_kafka",
    "relay_kafka_latency_1k",
}


@pytest.mark.timeout(600)
def test_quick_json_runs_every_scenario_and_loses_nothing(pg_dsn: str) -> None:
    """`python -m pgbus.bench --quick --json` runs every scenario against a baseline; lost = 0."""
    env = {**os.environ, "PGBUS_DSN": pg_dsn}
    report = json_report(["-m", "pgbus.bench", "--quick", "--json"], timeout=540, env=env)
    assert report["ok"] is True
    assert report["quick"] is True
    assert {"python", "asyncpg", "postgresql", "cpus"} <= set(report["machine"])
    scenarios = report["scenarios"]
    assert [s["name"] for s in scenarios] == list(bench.SCENARIOS)
    for s in scenarios:
        assert {"name", "unit", "pgbus", "baseline", "ratio", "lost", "target"} <= set(s), s
        assert s["error"] is None, s
        if s["skipped"]:
            # only the optional durable mode, pgbus-opentelemetry and pgbus-relay (or its broker)
            assert s["name"].startswith(("durable", "otel", "relay")), s
            assert not s["name"].startswith("otel") or not bench.otel_available(), s
            continue
        for side in ("pgbus_stats", "baseline_stats"):
            stats = s[side]
            assert stats["min"] <= stats["median"] <= stats["max"], s
            assert len(stats["values"]) == s["reps"], s
        assert s["pgbus"] == s["pgbus_stats"]["median"]
        assert s["baseline"] == s["baseline_stats"]["median"]
        if s["name"] in ("memory", "durable_rows"):
            assert s["ratio"] is None  # a growth near zero, or a count: no meaningful ratio
        else:
            assert s["pgbus"] > 0
            assert s["baseline"] > 0
            assert s["ratio"] == pytest.approx(s["pgbus"] / s["baseline"], rel=1e-2)
        if s["name"] in RECEIVING:
            assert s["lost"] == 0, s
        else:
            assert s["lost"] is None, s  # publishing only: nothing to lose here
        for peer in s["peers"].values():
            assert peer["lost"] in (0, None), s
    by_name = {s["name"]: s for s in scenarios}
    assert {"p50", "p99", "max"} <= set(by_name["latency_1k"]["pgbus_stats"]["details"])
    assert {"p50", "p99"} <= set(by_name["request"]["baseline_stats"]["details"])
    assert {"rss_small_mb", "rss_large_mb"} <= set(by_name["memory"]["baseline_stats"]["details"])


@pytest.mark.timeout(300)
def test_cli_command_prints_a_table_of_the_chosen_scenarios(pg_dsn: str) -> None:
    """`pgbus bench --quick --scenario ...` prints a table of those scenarios and exits 0."""
    result = CliRunner().invoke(
        bench_command,
        ["--quick", "--reps", "2", "--scenario", "publish", "--scenario", "receive"],
        obj=State(pg_dsn, 5.0),
    )
    assert result.exit_code == 0, result.output
    assert "publish" in result.output
    assert "receive" in result.output
    assert "publish_many" not in result.output
    assert "ok" in result.output.splitlines()[-1]


def test_failed_scenario_makes_the_exit_status_1(
    pg_dsn: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A scenario that raises is reported with its error, and the run exits with status 1."""

    async def broken(cfg: bench.Config) -> bench.Result:
        raise RuntimeError("boom")

    monkeypatch.setitem(bench.BENCHES, "publish", broken)
    status = bench.main(["--dsn", pg_dsn, "--quick", "--json", "--scenario", "publish"])
    assert status == 1
    (scenario,) = json.loads(capsys.readouterr().out)["scenarios"]
    assert scenario["name"] == "publish"
    assert scenario["error"] == "RuntimeError: boom"


def test_otel_scenarios_say_unavailable_without_the_plugin(
    pg_dsn: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without pgbus-opentelemetry the otel scenarios are skipped as unavailable; exit 0."""
    monkeypatch.setattr(bench, "otel_available", lambda: False)
    status = bench.main(["--dsn", pg_dsn, "--quick", "--json", "--scenario", "otel_metrics"])
    assert status == 0
    (scenario,) = json.loads(capsys.readouterr().out)["scenarios"]
    assert scenario["skipped"].startswith(
        "not available: pip install ./plugins/pgbus-opentelemetry"
    )


@pytest.mark.timeout(300)
def test_dashboard_scenario_polls_a_real_dashboard(
    pg_dsn: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """`receive_dashboard` runs `pgbus dashboard` and requests its overview while measuring."""
    status = bench.main(["--dsn", pg_dsn, "--quick", "--json", "--scenario", "receive_dashboard"])
    assert status == 0
    (scenario,) = json.loads(capsys.readouterr().out)["scenarios"]
    assert scenario["skipped"] is None
    assert scenario["lost"] == 0
    assert scenario["pgbus_stats"]["details"]["dashboard_requests"] >= 1
    assert "dashboard_requests" not in scenario["baseline_stats"]["details"]


def test_relay_scenarios_say_unavailable_without_the_plugin(
    pg_dsn: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without pgbus-relay the relay scenarios are skipped as unavailable; exit 0."""
    monkeypatch.setattr(bench, "relay_available", lambda broker: False)
    status = bench.main(["--dsn", pg_dsn, "--quick", "--json", "--scenario", "relay_nats"])
    assert status == 0
    (scenario,) = json.loads(capsys.readouterr().out)["scenarios"]
    assert scenario["skipped"] == "not available: pip install './plugins/pgbus-relay[nats]'"


def test_the_bench_does_not_import_the_plugin_until_a_scenario_needs_it() -> None:
    """Importing pgbus.bench imports neither pgbus_opentelemetry nor the SDK."""
    code = "import sys, pgbus.bench; print(sorted(m for m in sys.modules if 'opentelemetry' in m))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "[]"


def test_percentile_is_nearest_rank() -> None:
    """The latency percentiles use the nearest rank: p50 of 1..100 is 50, p99 is 99."""
    values = [float(v) for v in range(100, 0, -1)]
    assert bench.percentile(values, 0.5) == 50
    assert bench.percentile(values, 0.99) == 99
    assert bench.percentile(values, 1.0) == 100


def test_pgbus_bench_is_a_subcommand_of_the_cli() -> None:
    """`pgbus bench --help` is served by the root command group."""
    from pgbus.cli import cli

    result = CliRunner().invoke(cli, ["bench", "--help"])
    assert result.exit_code == 0, result.output
    assert "--quick" in result.output
    assert "versionadded" not in result.output
