"""The public surface: what pgbus exports, and that it ships its types."""

from __future__ import annotations

from pathlib import Path

import pgbus


def test_all_lists_exactly_the_public_names():
    """__all__ is sorted and equals the module's public names."""
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
    """Every exception pgbus exports is a PgbusError."""
    errors = [getattr(pgbus, n) for n in pgbus.__all__ if n != "__version__"]
    errors = [e for e in errors if isinstance(e, type) and issubclass(e, BaseException)]
    assert errors
    assert all(issubclass(e, pgbus.PgbusError) for e in errors)


def test_package_ships_py_typed():
    """The package is marked as typed (PEP 561)."""
    assert (Path(pgbus.__file__).parent / "py.typed").is_file()


def test_version_is_a_string():
    """__version__ is set."""
    assert isinstance(pgbus.__version__, str)
    assert pgbus.__version__.count(".") >= 2
