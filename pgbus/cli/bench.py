"""``pgbus bench``: pgbus measured side by side with raw asyncpg (see :mod:`pgbus.bench`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from pgbus import bench as _bench
from pgbus.cli._main import CONTEXT_SETTINGS

if TYPE_CHECKING:
    from pgbus.cli._common import State


@click.command(context_settings=CONTEXT_SETTINGS)
@click.option("--quick", is_flag=True, help="Small counts, one repetition: a smoke test.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
@click.option("--markdown", "as_markdown", is_flag=True, help="Print a Markdown table instead.")
@click.option(
    "--reps",
    type=click.IntRange(min=1),
    help="Repetitions of each scenario (default 5; --quick: 1).",
)
@click.option(
    "--scenario",
    "scenarios",
    multiple=True,
    type=click.Choice(_bench.SCENARIOS),
    help="Run only this scenario (repeatable).",
)
@click.pass_obj
def bench(
    state: State | None,
    quick: bool,
    as_json: bool,
    as_markdown: bool,
    reps: int | None,
    scenarios: tuple[str, ...],
) -> None:
    """Measure pgbus side by side with raw asyncpg, in the same run.

    Each scenario interleaves repetitions of pgbus and of its raw-asyncpg baseline and
    reports the median with the min and max. Without --dsn or $PGBUS_DSN it uses a
    server on 127.0.0.1:5432, or starts a throwaway one. It exits with status 1 when a
    scenario failed or lost events; it asserts nothing about speed.

    \f
    .. versionadded:: 0.1.0
    """
    status = _bench.run(
        dsn=state.dsn if state is not None else None,
        quick=quick,
        as_json=as_json,
        as_markdown=as_markdown,
        reps=reps,
        scenarios=scenarios or None,
    )
    if status:
        raise click.exceptions.Exit(status)
