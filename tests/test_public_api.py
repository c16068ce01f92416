"""The public surface: what pgbus exports, and that it ships its types."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pgbus


def test_all_lists_exactly_the_public_names():
    """__all__ is sorted and equals the module's public names (each one loads)."""
    for name in pgbus.__all__:  # the names are imported on first use
        getattr(pgbus, name)
    public = {n for n in vars(pgbus) if not n.startswith("_")} - {
        "annotations",
        "errors",
        "hookspecs",
        "types",
        "server",
        "default_plugins",
    }
    public = {n for n in public if not isinstance(getattr(pgbus, n), type(pgbus))}
    assert sorted(pgbus.__all__) == pgbus.__all__
    assert set(pgbus.__all__) - {"__version__"} == public


def test_every_error_derives_from_pgbus_error():
    """Every exception pgbus exports is a PgbusError, but the outcomes a handler raises."""
    outcomes = {pgbus.Nack, pgbus.Reject}  # control flow a handler raises, not errors of pgbus
    errors = [getattr(pgbus, n) for n in pgbus.__all__ if n != "__version__"]
    errors = [e for e in errors if isinstance(e, type) and issubclass(e, BaseException)]
    assert outcomes <= set(errors)
    assert all(issubclass(e, pgbus.PgbusError) for e in errors if e not in outcomes)
    assert not any(issubclass(e, pgbus.PgbusError) for e in outcomes)


def test_package_ships_py_typed():
    """The package is marked as typed (PEP 561)."""
    assert (Path(pgbus.__file__).parent / "py.typed").is_file()


def test_version_is_a_string():
    """__version__ is set."""
    assert isinstance(pgbus.__version__, str)
    assert pgbus.__version__.count(".") >= 2


def test_importing_pgbus_and_its_help_stays_light():
    """`pgbus --help` loads no asyncpg, pydantic, bench nor server; `publish --help` no bench."""
    code = (
        "import sys, pgbus\n"
        "from pgbus.cli import main\n"
        "sys.argv = ['pgbus', *sys.argv[1:], '--help']\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "heavy = ('asyncpg', 'pydantic', 'rich', 'pgbus.bench', 'pgbus.server', 'pgbus._bus')\n"
        "print('LOADED', [m for m in heavy if m in sys.modules])\n"
    )
    argv = [sys.executable, "-c", code]
    result = subprocess.run(argv, capture_output=True, text=True, check=True)
    assert "LOADED []" in result.stdout, result.stdout
    assert "run" in result.stdout  # the commands are listed all the same
    result = subprocess.run([*argv, "publish"], capture_output=True, text=True, check=True)
    assert "'pgbus.bench'" not in result.stdout
    assert "'pgbus.server'" not in result.stdout


def test_the_help_lists_each_command_with_its_own_short_help():
    """pgbus --help's command list (kept without importing them) matches each command's help."""
    import click

    from pgbus.cli import _main

    ctx = click.Context(_main.cli)
    for name, _, text in _main.COMMANDS:
        command = _main.cli.get_command(ctx, name)
        assert command is not None
        assert command.get_short_help_str(limit=90) == text, name
