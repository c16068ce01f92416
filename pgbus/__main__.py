"""``python -m pgbus``: the same as the ``pgbus`` command."""

from __future__ import annotations

from pgbus.cli import main

if __name__ == "__main__":
    main()
