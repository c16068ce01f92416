"""The hook-implementation marker, kept apart so that plugins can import it early."""

from __future__ import annotations

import pluggy

#: The marker for hook implementations: ``@pgbus.hookimpl def pgbus_on_connect(...)``.
hookimpl = pluggy.HookimplMarker("pgbus")
